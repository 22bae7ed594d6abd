"""On-disk format v1 (docs/format.md): names, manifest, index and data files."""

FORMAT_VERSION = 1
