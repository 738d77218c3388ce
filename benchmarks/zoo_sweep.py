"""Convert every CNN in timm and torchvision (random weights) and count what converts, what is refused, what fails.

Each architecture runs in its own process, with a time limit, at its own native size and a few classes: build
it with random weights, ``convify.convert`` it (which checks the map against the original at the native size),
then run the converted network on a larger, non-square input and compare the map's size with the geometry.
Outcomes:

- ``pass``: converted, exact at the native size, the map as large as the geometry says;
- ``attention``: refused because it is attention (ViT, Swin, BotNet...): out of scope, not in the pass rate;
- ``refused``: refused with another reason (an operation convify does not know, a map it cannot follow);
- ``error``: anything else (a build failure, an exception escaping convify, a wrong map size, the time limit).

The pass rate is over everything that is not attention. Prints one line per architecture as it finishes, then
the rate per source and the refusals grouped by reason:

    python benchmarks/zoo_sweep.py --sample 60 --seed 0          # a fixed random sample of timm and torchvision
    python benchmarks/zoo_sweep.py --source torchvision           # every torchvision classifier
    python benchmarks/zoo_sweep.py --source timm --jobs 2 --timeout 300
    python benchmarks/zoo_sweep.py --models resnet18 timm:botnet26t_256
    python benchmarks/zoo_sweep.py --source timm --shuffle --log sweep.jsonl   # resumable: rerun to go on

``--log FILE`` appends each outcome as a JSON line as it finishes and skips architectures the file already holds,
so a long sweep can be stopped and resumed; with ``--shuffle`` (a fixed order from ``--seed``) the outcomes so
far are a uniform random sample of the whole, and the rates printed are over what the log holds. ``--retry`` runs
again what the log holds as refused or error (after a fix); the last line of an architecture is its outcome.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import random
import re
import subprocess
import sys
import time

NUM_CLASSES = 5

# timm's transformer and MLP families (whole modules), left out of the sweep unless --families all: attention
# or token mixing is their core, not a part. Hybrids that mix convolutions and attention (MobileViT, MaxViT,
# EdgeNeXt, EfficientFormer...) stay in: the converter says which of their models are attention.
TRANSFORMER_MODULES = frozenset({
    "beit", "cait", "coat", "convit", "crossvit", "davit", "deepseek_vit", "deit", "eva", "gcvit", "gemma4_vit",
    "hiera", "hieradet_sam2", "levit", "mlp_mixer", "mvitv2", "naflexvit", "nest", "pit", "pvt_v2", "qwen3_vit",
    "sequencer", "swin_transformer", "swin_transformer_v2", "swin_transformer_v2_cr", "tiny_vit", "tnt", "twins",
    "vision_transformer", "vision_transformer_hybrid", "vision_transformer_relpos", "vision_transformer_sam",
    "vitamin", "volo", "xcit",
})


def one(source: str, name: str) -> dict:
    """Build, convert and run one architecture here; the outcome as a dict (never raises)."""
    import torch

    torch.set_num_threads(1)
    import convify
    from convify import ConversionError

    started = time.perf_counter()
    try:
        if source == "timm":
            import timm

            model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES).eval()
            size = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
        else:
            import torchvision

            kwargs = {"num_classes": NUM_CLASSES}
            if name in ("googlenet", "inception_v3"):
                kwargs.update(aux_logits=False, init_weights=False)
            model = torchvision.models.get_model(name, **kwargs).eval()
            size = 299 if name == "inception_v3" else 224
    except Exception as e:  # noqa: BLE001 - a model that cannot be built is reported, not ours to fix
        return {"outcome": "error", "why": f"build: {type(e).__name__}: {e}"}
    try:
        fcn = convify.convert(model, input_size=size)
        g = fcn.geometry
        height, width = size + 2 * g.stride, size + 3 * g.stride  # sizes every original accepts (DLA's merges)
        with torch.inference_mode():
            out = fcn(torch.randn(1, 3, height, width))
        out = out[0] if isinstance(out, (tuple, list)) else out
        if tuple(out.shape[2:]) != g.output_size(height, width):
            return {"outcome": "error", "why": f"map {tuple(out.shape[2:])}, geometry "
                                               f"{g.output_size(height, width)}", "size": size}
        return {"outcome": "pass", "size": size, "stride": g.stride, "local": g.local,
                "max_abs_diff": fcn.check.get("max_abs_diff"), "seconds": round(time.perf_counter() - started, 1)}
    except ConversionError as e:
        why = str(e)
        return {"outcome": "attention" if "is attention" in why or "attention" in why.split(";")[0] else "refused",
                "why": why, "size": size}
    except Exception as e:  # noqa: BLE001 - an exception escaping convify is a bug to report
        return {"outcome": "error", "why": f"{type(e).__name__}: {e}", "size": size}


def architectures(source: str, families: str = "cnn") -> list[tuple[str, str]]:
    """Every classifier of the source(s); with ``families="cnn"``, timm's :data:`TRANSFORMER_MODULES` left out."""
    found = []
    if source in ("all", "torchvision"):
        import torchvision

        found += [("torchvision", n) for n in torchvision.models.list_models(module=torchvision.models)]
    if source in ("all", "timm"):
        import timm

        left_out = set()
        if families == "cnn":
            for module in TRANSFORMER_MODULES & set(timm.list_modules()):
                left_out.update(timm.list_models(module=module))
        found += [("timm", n) for n in timm.list_models() if n not in left_out]
    return found


def reason(why: str) -> str:
    """A refusal's reason without the layer's name: what groups the failures."""
    why = re.sub(r"^'[^']*' \(([^)]*)\)", r"\1", why.splitlines()[0])
    return re.sub(r"'[^']*'", "'...'", why)[:110]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=["all", "timm", "torchvision"], default="all")
    parser.add_argument("--families", choices=["cnn", "all"], default="cnn",
                        help="cnn: leave out timm's transformer and MLP families (TRANSFORMER_MODULES)")
    parser.add_argument("--models", nargs="+", help="source:name or a name (torchvision first, then timm)")
    parser.add_argument("--sample", type=int, help="a random sample of this many architectures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per architecture")
    parser.add_argument("--jobs", type=int, default=1, help="architectures at a time (one process each)")
    parser.add_argument("--json", help="also write every outcome to this JSON file")
    parser.add_argument("--log", help="append each outcome to this JSON-lines file; skip what it already holds")
    parser.add_argument("--shuffle", action="store_true", help="a random order (from --seed), not by name")
    parser.add_argument("--report", action="store_true",
                        help="with --log: print the rates over what the log holds, and run nothing")
    parser.add_argument("--retry", action="store_true",
                        help="with --log: run again what the log holds as refused or error (after a fix)")
    parser.add_argument("--one", nargs=2, metavar=("SOURCE", "NAME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return

    todo = architectures(args.source, args.families)
    if args.models:
        known = {name: source for source, name in reversed(architectures(args.source, "all"))}
        todo = [tuple(m.split(":", 1)) if ":" in m else (known.get(m, "timm"), m) for m in args.models]
    if args.sample:
        todo = sorted(random.Random(args.seed).sample(todo, min(args.sample, len(todo))))
    if args.shuffle:
        random.Random(args.seed).shuffle(todo)
    done_before: list[dict] = []
    if args.log:
        try:
            with open(args.log) as f:
                done_before = [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            pass
        if args.retry:  # the last outcome of each architecture decides; failures run again
            last = {(r["source"], r["name"]): r for r in done_before}
            done_before = [r for r in last.values() if r["outcome"] in ("pass", "attention")]
        seen = {(r["source"], r["name"]) for r in done_before}
        done_before = list({(r["source"], r["name"]): r for r in done_before
                            if (r["source"], r["name"]) in set(todo)}.values())  # the last line of each decides
        todo = [] if args.report else [item for item in todo if item not in seen]

    def run(item: tuple[str, str]) -> dict:
        source, name = item
        try:
            done = subprocess.run([sys.executable, __file__, "--one", source, name], capture_output=True, text=True,
                                  timeout=args.timeout)
            lines = done.stdout.strip().splitlines()
            result = json.loads(lines[-1]) if done.returncode == 0 and lines else \
                {"outcome": "error", "why": f"exit {done.returncode}: {done.stderr.strip()[-200:]}"}
        except subprocess.TimeoutExpired:
            result = {"outcome": "error", "why": f"over the {args.timeout:.0f} s limit"}
        return {"source": source, "name": name, **result}

    print(f"{len(todo)} architectures, {args.jobs} at a time, {args.timeout:.0f} s each at most"
          + (f" ({len(done_before)} done before, in {args.log})" if done_before else ""), flush=True)
    results = list(done_before)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for r in pool.map(run, todo):
            results.append(r)
            if args.log:
                with open(args.log, "a") as f:
                    f.write(json.dumps(r) + "\n")
            detail = f"stride {r['stride']}, {'local' if r['local'] else 'global context'}" \
                if r["outcome"] == "pass" else reason(r.get("why", ""))
            print(f"{r['outcome']:<9} {r['source']:<11} {r['name']:<40} {detail}", flush=True)

    print()
    for source in ("torchvision", "timm"):
        mine = [r for r in results if r["source"] == source]
        if not mine:
            continue
        counts = collections.Counter(r["outcome"] for r in mine)
        scope = len(mine) - counts["attention"]
        print(f"{source}: {counts['pass']} of {scope} non-attention architectures convert "
              f"({100 * counts['pass'] / max(1, scope):.1f}%); {counts['attention']} refused as attention, "
              f"{counts['refused']} refused otherwise, {counts['error']} errors")
    failures = collections.Counter(reason(r.get("why", "")) for r in results if r["outcome"] in ("refused", "error"))
    if failures:
        print("\nnot converted, by reason:")
        for why, count in failures.most_common():
            names = [r["name"] for r in results if r["outcome"] in ("refused", "error")
                     and reason(r.get("why", "")) == why]
            print(f"{count:>4}  {why}  ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
