"""Pack this interpreter's standard-library ``.py`` files into a deterministic ``.tar.xz``.

The GPU machine has another Python version; training on an archive made here makes the corpus
(and so the held-out files) the same files that exist on the development machines.

    python scripts/train_make_corpus.py artifacts/corpus/stdlib.tar.xz
"""

from __future__ import annotations

import io
import json
import os
import sys
import sysconfig
import tarfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_data import read_corpus  # noqa: E402


def main() -> None:
    out = sys.argv[1]
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    files, info = read_corpus(sysconfig.get_paths()["stdlib"])
    info = {"python_version": info["python_version"], "num_files": info["num_files"], "bytes": info["bytes"]}
    with tarfile.open(out, "w:xz") as tar:
        for name, data in [("CORPUS_INFO.json", json.dumps(info).encode())] + [
            (rel, text.encode()) for rel, text in files
        ]:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
            tar.addfile(ti, io.BytesIO(data))
    print(f"{out}: {info}, {os.path.getsize(out) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
