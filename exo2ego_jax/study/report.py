"""The study's numbers and tables: accuracies over seeds, paired comparisons, probe tables, the plot."""
from __future__ import annotations

import numpy as np

from exo2ego_jax.eval.stats import bootstrap_mean, paired_bootstrap
from exo2ego_jax.study.probes import FEATURES, STAGES
from exo2ego_jax.study.runs import COMPARISONS


def summarize(correct: dict, seeds_of: dict, n_items: int) -> dict:
    """correct: {variant: [seeds, items] 0/1}; seeds_of: {variant: [seed, ...]}. Accuracies in %, 95% intervals
    from the bootstrap over seeds and items; comparisons paired on the seeds both variants ran."""
    out = {"n_items": n_items, "seeds": {v: list(s) for v, s in seeds_of.items()}, "variants": {}, "comparisons": {}}
    for v, m in correct.items():
        per_seed = [100.0 * float(np.mean(row)) for row in m]
        boot = bootstrap_mean(m)
        out["variants"][v] = {"accuracy": per_seed, "mean": float(np.mean(per_seed)),
                              "std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0,
                              "ci95": [100.0 * boot["ci95"][0], 100.0 * boot["ci95"][1]],
                              "seeds": list(seeds_of[v])}
    for name in COMPARISONS:
        a, b = name.split("-", 1)
        if a in correct and b in correct:
            shared = [s for s in seeds_of[a] if s in seeds_of[b]]
            d = paired_bootstrap(_rows(correct, seeds_of, a, shared), _rows(correct, seeds_of, b, shared))
            out["comparisons"][name] = {"diff": 100.0 * d["diff"], "ci95": [100.0 * d["ci95"][0], 100.0 * d["ci95"][1]],
                                        "seeds": shared}
    return out


def _rows(correct: dict, seeds_of: dict, variant: str, seeds) -> np.ndarray:
    """The variant's correctness rows of `seeds`, in that order."""
    order = list(seeds_of[variant])
    return np.asarray([correct[variant][order.index(s)] for s in seeds])


def accuracy_markdown(r: dict) -> list[str]:
    lines = ["| variant | seeds | accuracy (mean ± std over seeds) | 95% CI | per seed |", "|---|---|---|---|---|"]
    for v, x in r["variants"].items():
        lines.append(f"| {v} | {len(x['accuracy'])} | {x['mean']:.1f} ± {x['std']:.1f} | "
                     f"[{x['ci95'][0]:.1f}, {x['ci95'][1]:.1f}] | " + ", ".join(f"{a:.1f}" for a in x["accuracy"]) + " |")
    lines += ["", "| comparison | seeds | difference (points) | 95% CI (paired bootstrap over seeds and items) |",
              "|---|---|---|---|"]
    lines += [f"| {k} | {len(c['seeds'])} | {c['diff']:+.1f} | [{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}] |"
              for k, c in r["comparisons"].items()]
    return lines


def probe_markdown(probes: dict) -> list[str]:
    """One row per variant and stage, one column per feature: accuracy % [95% CI]."""
    lines = ["| variant | stage | " + " | ".join(FEATURES) + " |", "|---|---|" + "---|" * len(FEATURES)]
    for v, stages in probes.items():
        for stage in STAGES:
            if stage in stages:
                cells = [f"{stages[stage][k]['accuracy']:.1f} [{stages[stage][k]['ci95'][0]:.0f}, "
                         f"{stages[stage][k]['ci95'][1]:.0f}]" for k in FEATURES]
                lines.append(f"| {v} | {stage} | " + " | ".join(cells) + " |")
    return lines


def write_markdown(path: str, r: dict) -> None:
    seeds = sorted({len(s) for s in r["seeds"].values()})
    lines = [f"# Ablation study on the synthetic ego-exo task ({r['mode']}, {r['items']})", "",
             f"{r['n_items']} four-option questions (chance 25%), {'/'.join(map(str, seeds))} seeds per variant, "
             f"option log-likelihood. Commit {r['commit']}, {r['machine']}, {r['elapsed_s'] / 60:.0f} min.", "",
             f"Setup: {r['setup']}", ""]
    lines += accuracy_markdown(r)
    if r.get("probes"):
        lines += ["", f"Linear probes of the action (fit on the {r['probe_n_train']} training clips, scored on the "
                  f"same {r['n_items']} held-out clips; accuracy %, 95% CI; chance 25%):", ""]
        lines += probe_markdown(r["probes"])
    lines += ["", f"Budgets (steps of batch 8): {r['budget']}"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(path: str, r: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(r["variants"])
    means = [r["variants"][v]["mean"] for v in names]
    err = np.array([[m - r["variants"][v]["ci95"][0], r["variants"][v]["ci95"][1] - m] for v, m in zip(names, means)]).T
    fig, ax = plt.subplots(figsize=(1.0 * len(names) + 2, 3.2))
    ax.bar(names, means, yerr=err, capsize=3, color=["C1" if v == "full" else "C0" for v in names])
    ax.axhline(25, color="grey", lw=0.8, ls="--")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(f"{r['n_items']} questions; 95% CI over seeds and items", fontsize=9)
    ax.tick_params(axis="x", labelrotation=35, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
