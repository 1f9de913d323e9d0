"""How many bits a LoRA adapter's stored factors need: relative error of the stored update.

    python -m benchmarks.lora_bits [--out benchmarks/results/lora_bits]

LoRA-shaped factors (``A`` a Kaiming-uniform initialization plus a trained part, ``B`` trained
from zero, scaling 2) of three shapes are stored as tvbase stores an adapter's factors
(:func:`tvbase.methods.lora._lowrank`: SVD form, a scale per column), at each precision; the
error is ``||L R^T - A B^T|| / ||L R^T||``, exact, from the factors. Writes ``lora_bits.json``
and ``lora_bits.md`` to ``--out``.
"""

import argparse
import json
from pathlib import Path

import torch

from tvbase.methods.lora import _lowrank

SHAPES = [(384, 384, 16), (1536, 384, 8), (4096, 4096, 16)]  # (out, in, r): MiniLM, its MLP, a 7B LLM
BITS = (4, 8, 16)


def run(seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for m, n, r in SHAPES:
        a = (torch.rand(r, n, generator=gen) * 2 - 1) / n**0.5 + 0.1 * torch.randn(r, n, generator=gen) / n**0.5
        b = 0.01 * torch.randn(m, r, generator=gen)
        for bits in BITS:
            _, _, error, total = _lowrank(2.0 * b, a.T, bits)
            rows.append({"out": m, "in": n, "r": r, "bits": bits, "rel_error": (error / total) ** 0.5,
                         "stored_over_raw_fp32": (m + n) * r * bits / 8 / (4 * m * n)})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/lora_bits"))
    args = p.parse_args(argv)
    rows = run()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora_bits.json").write_text(json.dumps({"command": "python -m benchmarks.lora_bits", "rows": rows}, indent=2))
    lines = ["| out x in | r | bits | rel. error | stored / raw fp32 |", "|---|---|---|---|---|"]
    lines += [f"| {x['out']} x {x['in']} | {x['r']} | {x['bits']} | {x['rel_error']:.4f} | {x['stored_over_raw_fp32']:.3%} |" for x in rows]
    (args.out / "lora_bits.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
