"""On-disk format v1 (docs/format.md): names, manifest, index and data files."""

FORMAT_VERSION = 1


def strict_json(data: bytes | str):  # noqa: ANN201 - any JSON value
    """Parse RFC 8259 JSON strictly: no NaN/Infinity literals, no duplicate member names.

    Raises ValueError (or UnicodeDecodeError) on anything else, nesting too deep included.
    """
    import json

    def no_constants(name: str):  # noqa: ANN202
        raise ValueError(f"{name} is not valid JSON")

    def unique(pairs: list) -> dict:
        d = dict(pairs)
        if len(d) != len(pairs):
            raise ValueError("duplicate member name in JSON object")
        return d

    try:
        return json.loads(data, parse_constant=no_constants, object_pairs_hook=unique)
    except RecursionError:  # "[[[[..." deeper than the interpreter's stack: damage, not a crash
        raise ValueError("JSON nested too deeply") from None
