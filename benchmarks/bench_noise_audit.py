"""Noise audit experiment: do ALIP's gates find swapped AltTexts, and does filtering with them help plain CLIP?

On the bundled demo data (2900 training drawings), a seeded share of the rows (default 30%) get another chosen
row's AltText (a random cycle through the chosen rows, so each of them is mismatched with its image; the few rows
whose new text equals the old one are not counted as noisy); the column `noisy` records which. Then:

1. train ALIP (`--recipe alip`) and plain CLIP (`--recipe clip`) on the noisy data, same size, epochs and seed;
2. `recaption.audit` of the noisy data with the ALIP model (`--clip_score_model` the CLIP model): the detection
   ROC AUC of every score against `noisy` (LCG weight, DCG weights, similarities, the ALIP model's CLIP-score
   `similarity_image_text`, the CLIP model's `clip_score`);
3. keep the best `--keep_fraction` (default 1 - noise share) by the LCG weight, and by the CLIP model's CLIP-score;
4. train plain CLIP on each filtered set with the same budget as on the unfiltered data (the same number of
   optimizer steps of the same batch size, so the same number of samples seen), and evaluate all of them on the
   held-out demo test split (clean: zero-shot top-1 over 15 categories, retrieval recall@k).

    python benchmarks/bench_noise_audit.py                      # about 15 min on 2 CPU cores
    python benchmarks/bench_noise_audit.py --epochs 1           # a quicker look
    python benchmarks/bench_noise_audit.py --resume             # continue an interrupted run (finished trainings kept)

Prints two Markdown tables (detection, evaluation) and writes `<work_dir>/results.json`; the audit's report for
each filter score is in `<work_dir>/report-<score>/`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alip_hf.resources import DEMO_DATA  # noqa: E402
from alip_hf.schema import ALT_TEXT, AUDIT_SCORES, CLIP_SCORE, LCG_WEIGHT_RAW  # noqa: E402

EVAL_KEYS = ("eval/demo/acc1", "eval/demo/image_retrieval_recall@1", "eval/demo/image_retrieval_recall@10",
             "eval/demo/text_retrieval_recall@1", "eval/demo/text_retrieval_recall@10")


def make_noisy(out_dir: Path, fraction: float, seed: int) -> dict:
    """The demo train split with `fraction` of its AltTexts cycled among the chosen rows; column `noisy`."""
    from alip_hf.data import load_source

    dataset = load_source(str(DEMO_DATA), split="train")
    texts = list(dataset[ALT_TEXT])
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(texts), size=round(fraction * len(texts)), replace=False)
    new_texts = list(texts)
    for position, row in enumerate(chosen):  # row chosen[i] gets the text of chosen[i + 1]
        new_texts[row] = texts[chosen[(position + 1) % len(chosen)]]
    noisy = [a != b for a, b in zip(texts, new_texts)]
    dataset = dataset.remove_columns(ALT_TEXT).add_column(ALT_TEXT, new_texts).add_column("noisy", noisy)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(out_dir / "train-00000-of-00001.parquet"))
    return {"rows": len(texts), "swapped": len(chosen), "noisy": int(sum(noisy))}


def train(output_dir: Path, train_data: Path, recipe: str, args, max_steps: int | None = None) -> dict:
    """Trains (or, when this run's summary is already there, reuses) one model; returns its steps, time, eval."""
    from alip_hf.train import main as train_main

    done = output_dir / "bench_run.json"
    if done.exists():
        return json.loads(done.read_text())

    argv = ["--model_config", args.model_config, "--recipe", recipe, "--train_data", str(train_data),
            "--eval_data", str(DEMO_DATA), "--output_dir", str(output_dir), "--report_to", "none",
            "--per_device_train_batch_size", str(args.batch_size), "--learning_rate", "5e-4",
            "--seed", str(args.seed), "--logging_steps", "50"]
    argv += ["--max_steps", str(max_steps)] if max_steps else ["--num_train_epochs", str(args.epochs)]
    train_main(argv)
    result = run_summary(output_dir, args.batch_size)
    done.write_text(json.dumps(result))
    return result


def run_summary(output_dir: Path, batch_size: int) -> dict:
    """Steps, training-loop seconds (from the logged samples/s) and the final evaluation of a finished run."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "train/samples_per_second" in r][-1]  # the evaluation may be logged on its own
    evaluation = {k: r[k] for r in rows for k in EVAL_KEYS if k in r}  # the last value of each key
    return {"steps": last["step"], "seconds": round(last["step"] * batch_size / last["train/samples_per_second"], 1),
            **evaluation}


def audit(output_dir: Path, source: Path, model: Path, clip_model: Path, score: str, keep_fraction: float) -> dict:
    from recaption.audit import main as audit_main

    return audit_main(["--model", str(model), "--clip_score_model", str(clip_model), "--source", str(source),
                       "--output_dir", str(output_dir), "--shard_size", "1000", "--score", score,
                       "--keep_fraction", str(keep_fraction), "--noise_column", "noisy"])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="outputs/noise-audit")
    parser.add_argument("--noise_fraction", type=float, default=0.3)
    parser.add_argument("--keep_fraction", type=float, default=None, help="default: 1 - noise_fraction")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--model_config", default="small")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true",
                        help="keep --work_dir and reuse the finished trainings of an interrupted run of the same settings")
    args = parser.parse_args(argv)
    keep = args.keep_fraction if args.keep_fraction is not None else 1 - args.noise_fraction
    work = Path(args.work_dir)
    settings_file = work / "settings.json"
    settings = json.dumps({k: v for k, v in vars(args).items() if k != "resume"}, sort_keys=True)
    if work.exists() and not (args.resume and settings_file.exists() and settings_file.read_text() == settings):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(settings)
    started = time.perf_counter()

    results = {"settings": {k: v for k, v in vars(args).items() if k != "resume"} | {"keep_fraction": keep}}
    results["data"] = make_noisy(work / "noisy", args.noise_fraction, args.seed)
    runs = {"alip (noisy data)": train(work / "alip", work / "noisy", "alip", args),
            "clip (noisy data, unfiltered)": train(work / "clip", work / "noisy", "clip", args)}
    budget = runs["clip (noisy data, unfiltered)"]["steps"]

    # One scoring pass; the second call only refilters (the scores are resumed, not recomputed).
    filtered = {}
    for score in (LCG_WEIGHT_RAW, CLIP_SCORE):
        summary = audit(work / "audit", work / "noisy", work / "alip", work / "clip", score, keep)
        filtered[score] = work / f"filtered-{score}"
        shutil.rmtree(filtered[score], ignore_errors=True)
        os.replace(work / "audit" / "filtered", filtered[score])
        shutil.rmtree(work / f"report-{score}", ignore_errors=True)  # histogram, contact sheet, HTML per score
        os.replace(work / "audit" / "report", work / f"report-{score}")
        results.setdefault("filter", {})[score] = summary["filter"]
    results["detection"] = summary["noise_detection"]
    for score, data in filtered.items():
        runs[f"clip (filtered by {score})"] = train(work / f"clip-{score}", data, "clip", args, max_steps=budget)
    results["runs"] = runs
    results["seconds"] = round(time.perf_counter() - started, 1)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(tables(results))
    return results


def tables(results: dict) -> str:
    d = results["data"]
    detection = results["detection"]
    lines = [f"noisy rows: {d['noisy']} of {d['rows']} (AltTexts cycled among {d['swapped']} rows); "
             f"kept fraction {results['settings']['keep_fraction']:.2f}", "",
             "| score (higher = cleaner) | detection ROC AUC | kept rows clean | dropped rows noisy |",
             "|---|---:|---:|---:|"]
    names = {"similarity_image_text": "similarity_image_text (CLIP-score of the ALIP model)",
             CLIP_SCORE: "clip_score (CLIP-score of the CLIP-recipe model)"}
    for score in AUDIT_SCORES:
        m = detection["scores"][score]
        lines.append(f"| {names.get(score, score)} | {m['auc']:.3f} | {m['kept_clean_precision']:.3f} | "
                     f"{m['dropped_noisy_precision']:.3f} |")
    lines += ["", "| run | train rows | steps | zero-shot top-1 | T->I R@1 | T->I R@10 | I->T R@1 | I->T R@10 | "
              "training loop s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, run in results["runs"].items():
        rows = d["rows"]
        for score, summary in results.get("filter", {}).items():
            if score in name:
                rows = summary["kept"]
        cells = [f"{100 * run.get(k, float('nan')):.1f}" for k in EVAL_KEYS]
        lines.append(f"| {name} | {rows} | {run['steps']} | " + " | ".join(cells) + f" | {run['seconds']:.0f} |")
    lines.append(f"\nthis invocation: {results['seconds'] / 60:.1f} min")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
