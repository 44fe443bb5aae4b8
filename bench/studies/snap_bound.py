"""SplitLLM's dχ with its snap, on the input-embedding board's prompts: how many tokens pass through unchanged?

    python -m invbench.studies.snap_bound --out bench/studies/SNAP-BOUND.md

SplitLLM (`sfl/model/noise/dxp.py`) adds dχ noise to the input embeddings (one radius per call) and then
snaps each noisy vector to a token's embedding. An attack on the snapped output is costly to score (the law
`SnappedDChiNoise` estimates P(snap = observed | token) by sampling, minutes per position on a CPU), so the
board's entries measure the noise without the snap, an upper bound on what the snapped output leaks. This
study gives the matching lower bound without any attack: the snapped tokens are themselves a guess of the
text (read them and you have them), so the fraction of positions whose snap is the true token is token
accuracy that any attacker gets for free. Same prompts, seed and per-prompt noise streams as the board
(`c4-smollm2-10tok-layer0`), for each relative epsilon and snap metric given.
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
from pathlib import Path

PROTOCOL = "c4-smollm2-10tok-layer0"


def snapped_accuracy(relative_epsilon: float, metric: str, *, n: int | None) -> tuple[float, float, int]:
    """(token accuracy of reading the snapped tokens, exact-match rate, prompts) on the protocol's prompts."""
    import torch

    from ..protocols import get_protocol
    from ..runner import bind_needs, capture, defend, load_source, prepare, sized

    protocol = get_protocol(PROTOCOL)
    params = {"relative_epsilon": relative_epsilon, "shared_radius": True, "snap": True, "snap_metric": metric}
    cfg = protocol.run_config(defense="dchi", defense_params=params, out="unused", device="cpu",
                                 prompts=list(range(n)) if n else None)
    cfg.attacks, cfg.attack_options = ["nearest"], {}  # no attack runs: prepare wants one that its options fit
    cfg, device, defense, _ = prepare(cfg, echo=lambda line: None)
    source = load_source(cfg, device, echo=lambda line: None)
    cfg, defense = sized(cfg, defense, source.loaded, echo=lambda line: None)
    bind_needs(defense, source.loaded)
    leak = defend(defense, source.prompts, capture(source.oracle, source.prompts, batch_size=cfg.batch_size),
                  seed=cfg.seed)
    table = source.loaded.model.get_input_embeddings().weight.detach().float()
    states = leak.defended.reshape(-1, table.shape[1]).float()
    snapped = torch.cat([torch.cdist(part, table).argmin(dim=1) for part in states.split(256)])  # exact rows
    truth = torch.tensor([p.ids for p in source.prompts]).reshape(-1)
    hits = (snapped == truth).reshape(len(source.prompts), -1)
    return hits.float().mean().item(), hits.all(dim=1).float().mean().item(), len(source.prompts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m invbench.studies.snap_bound", description=__doc__.split("\n\n")[0])
    parser.add_argument("--relative-epsilons", default="0.1,0.2,0.4", help="SplitLLM's experiment settings")
    parser.add_argument("--metrics", default="dot,cosine", help="snap metrics (SplitLLM's default: dot)")
    parser.add_argument("--n", type=int, default=None, help="first N prompts (default: the protocol's)")
    parser.add_argument("--out", type=Path, default=None, help="Markdown file to write (default: print)")
    args = parser.parse_args(argv)
    rows = ["| relative ε | snap metric | snapped token = true token (token acc. of reading them) | prompts unchanged "
            "| prompts |", "| --- | --- | --- | --- | --- |"]
    for rel in (float(r) for r in args.relative_epsilons.split(",")):
        for metric in args.metrics.split(","):
            accuracy, exact, n = snapped_accuracy(rel, metric, n=args.n)
            rows.append(f"| {rel:g} | {metric} | {accuracy:.3f} | {exact:.2f} | {n} |")
    text = "\n".join([f"Measured {dt.date.today().isoformat()} on {platform.machine()} (CPU); protocol `{PROTOCOL}`. "
                      f"Command: `python -m invbench.studies.snap_bound {' '.join(argv if argv is not None else sys.argv[1:])}`",
                      "", *rows]) + "\n"
    if args.out:
        args.out.write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
