"""``python -m ckptguard.bench``: the same command as ``ckptguard bench``."""

from .cli import bench

if __name__ == "__main__":
    bench(prog_name="ckptguard bench")
