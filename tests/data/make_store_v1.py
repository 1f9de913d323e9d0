"""Write tests/data/store-v1: a tiny store in format version 1, kept to catch on-disk format breaks.

Run once per format version (`python tests/data/make_store_v1.py`); the directory it writes is
committed and never regenerated, so a later tvbase must still read it (tests/test_format.py).
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

from tvbase import FitParams, Store

HERE = Path(__file__).parent


def main():
    out = HERE / "store-v1"
    work = HERE / "store-v1-inputs"
    work.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(12, 8, generator=g), "b": torch.randn(12, generator=g), "conv": torch.randn(4, 2, 3, 3, generator=g)}
    save_file(base, work / "base.safetensors")
    for t in range(4):
        ft = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(ft, work / f"t{t}.safetensors")
    store = Store.create(out, work / "base.safetensors", params=FitParams(budget=0.6))
    store.ingest({f"t{t}": work / f"t{t}.safetensors" for t in range(3)}, progress=False)
    store.ingest({"t3": work / "t3.safetensors"}, progress=False)  # a per-task SVD task too
    expected = {f"{task}/{k}": v for task in store.tasks for k, v in store.get(task, device="cpu").items()}
    expected.update({f"compose/{k}": v for k, v in store.compose({"t0": 0.5, "t3": -1.0}, device="cpu").items()})
    save_file(expected, HERE / "store-v1-expected.safetensors")
    for f in work.iterdir():
        f.unlink()
    work.rmdir()


if __name__ == "__main__":
    main()
