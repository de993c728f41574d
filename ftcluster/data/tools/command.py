"""`ftcluster data prepare|validate|stats|dedup|scrub|contamination|split`: the argument parsing and the printed
reports; each job lives in its own module."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from ftcluster.data.formats import EXPECTS, SUPPORTED, read_records
from ftcluster.data.tools.contamination import find_contamination
from ftcluster.data.tools.output import check_output, claim_output, command, write_like
from ftcluster.data.tools.scrub import KINDS, check_region, scrub_record
from ftcluster.data.tools.validate import validate
from ftcluster.util.atomic import replacing
from ftcluster.util.outputs import claim_files, claim_folder, mark_files, mark_folder

OVERWRITE_HELP = "replace an earlier output of this same command at --out (never the input or another file)"

# Lists printed to the terminal stop here, with a count of the rest (the JSON reports of dedup, scrub and
# contamination --out hold every entry).
SHOWN = 20


def data_command(args: list[str]) -> int:
    if args[:1] == ["prepare"]:
        # Its arguments are train's overrides (key=value, group=option), which argparse cannot list.
        from ftcluster.data.tools.prepare import prepare_command

        return prepare_command(args[1:])
    ns = _parser().parse_args(args)
    return ns.run(ns)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftcluster data", description=f"Data files: {SUPPORTED}.")
    sub = parser.add_subparsers(dest="job", required=True,
                                metavar="prepare|validate|stats|dedup|scrub|contamination|split")
    sub.add_parser("prepare", help="prepare, once, what `ftcluster train` with the same overrides trains on")
    formats = list(EXPECTS)

    p = sub.add_parser("validate", help="check every record; list every bad one as file:line: message")
    p.add_argument("file")
    p.add_argument("--format", choices=formats, help="default: guessed from the records' fields")
    p.set_defaults(run=_validate)

    p = sub.add_parser("stats", help="token lengths per split under the training tokenizer and template")
    p.add_argument("file")
    p.add_argument("--eval", help="an eval split, reported beside the training one")
    p.add_argument("--format", choices=formats, help="default: guessed from the records' fields")
    p.add_argument("--model", help="a conf/model/ name (tiny, smollm2, ...) or a Hugging Face model folder "
                                   "(default: the training default)")
    p.add_argument("--max-seq-len", type=int, help="default: conf/train.yaml's trainer.max_seq_len")
    p.add_argument("--chat-template", help="inline Jinja or a .jinja file, as data.chat_template")
    p.add_argument("--out", type=Path, help="where stats.json and lengths.png go (default runs/data_stats/<file>)")
    p.set_defaults(run=_stats)

    p = sub.add_parser("dedup", help="remove exact and near-duplicate records, keeping the first")
    p.add_argument("file")
    p.add_argument("--out", type=Path, required=True, help="the deduplicated file (same format as the input)")
    p.add_argument("--near-threshold", type=float, default=0.85,
                   help="Jaccard similarity of word shingles from which records are near duplicates")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(run=_dedup)

    p = sub.add_parser("scrub", help="replace e-mail addresses, phone numbers, IPv4 addresses, API keys and tokens")
    p.add_argument("file")
    p.add_argument("--out", type=Path, required=True, help="the scrubbed file (same format as the input)")
    p.add_argument("--phone-region", default="US", help="how phone numbers without a +country prefix are read")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(run=_scrub)

    p = sub.add_parser("contamination", help="eval examples whose text overlaps the training data")
    p.add_argument("train")
    p.add_argument("eval")
    p.add_argument("--ngram", type=int, default=13, help="words per n-gram")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="share of an eval example's n-grams found in train from which it counts as contaminated")
    p.add_argument("--out", type=Path, help="also write the full list as JSON here")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(run=_contamination)

    p = sub.add_parser("split", help="a seeded train/eval split (the one data.eval_fraction and seed make)")
    p.add_argument("file")
    p.add_argument("--eval-fraction", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="folder for train.<ext> and eval.<ext>")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(run=_split)
    return parser


def _validate(ns) -> int:
    report = validate(ns.file, ns.format)
    if report.format is None:
        how = "no record could be read, so none was checked against a format"
    elif report.guessed_from:
        how = f"format {report.format}, guessed from the fields {', '.join(report.guessed_from)}"
    else:
        how = f"format {report.format}, given"
    for error in report.errors[:SHOWN]:
        print(error)
    if len(report.errors) > SHOWN:
        print(f"... and {len(report.errors) - SHOWN} more bad records")
    if report.errors:
        print(f"{ns.file}: {len(report.errors)} of {report.records} records are bad ({how})")
        return 2
    print(f"{ns.file}: all {report.records} records are valid ({how})")
    return 0


def _stats(ns) -> int:
    # not at the top: it imports torch, transformers and matplotlib (seconds), which the other jobs do without
    from ftcluster.data.tools.stats import length_stats, write_report

    splits = {"train": ns.file, **({"eval": ns.eval} if ns.eval else {})}
    out = ns.out or Path("runs") / "data_stats" / Path(ns.file).stem
    # Its own earlier report there is replaced, as it always was (a report, cheap to redo); anything else refused.
    claim_folder(out, command("stats"), option="--out", inputs=splits.values(), overwrite=True)
    result = length_stats(splits, ns.format, ns.model, ns.max_seq_len, ns.chat_template)
    print(f"format {result['format']}, model {result['model']}, limit {result['limit']} tokens "
          f"({result['limit_means']})")
    print(f"{'split':<6} {'examples':>8} {'min':>6} {'median':>6} {'p90':>6} {'p99':>6} {'max':>6} {'over':>6}")
    for name, s in result["splits"].items():
        print(f"{name:<6} {s['examples']:>8} {s['min']:>6} {s['median']:>6} {s['p90']:>6} {s['p99']:>6} "
              f"{s['max']:>6} {s['over_limit']:>6}")
    stats_file, png = write_report(result, out)
    mark_folder(out, command("stats"), names=[stats_file.name, png.name])
    print(f"wrote {stats_file} and {png}")
    return 0


def _dedup(ns) -> int:
    from ftcluster.data.tools.dedup import find_duplicates  # not at the top: datasketch imports scipy (a second)

    claim_output(ns.file, ns.out, "dedup", ns.overwrite, [_report_path(ns.out, "dedup")])
    result = find_duplicates(read_records(ns.file), ns.near_threshold)
    write_like(ns.file, ns.out, result.kept)
    counts = result.counts()
    report = _sidecar(ns.out, "dedup", {**counts, "near_threshold": ns.near_threshold,
                                        "removed": [vars(d) for d in result.removed]})
    mark_files([ns.out, report], command("dedup"))
    for d in result.removed[:SHOWN]:
        print(f"{ns.file}:{d.line}: {d.kind} duplicate of line {d.of}"
              + (f" (similarity {d.similarity})" if d.kind == "near" else ""))
    if len(result.removed) > SHOWN:
        print(f"... and {len(result.removed) - SHOWN} more (all in {report})")
    print(f"{counts['records']} records: {counts['exact']} exact and {counts['near']} near duplicates removed, "
          f"{counts['kept']} kept -> {ns.out} (report {report})")
    return 0


def _scrub(ns) -> int:
    check_region(ns.phone_region)
    claim_output(ns.file, ns.out, "scrub", ns.overwrite, [_report_path(ns.out, "scrub")])
    lines, replaced, counts = [], {}, Counter()
    for line, record in read_records(ns.file):
        lines.append(line)
        scrubbed, found = scrub_record(record, ns.phone_region)
        if found:
            replaced[line] = scrubbed
            counts += found
    write_like(ns.file, ns.out, lines, replaced)
    by_kind = {kind: counts[kind] for kind in KINDS if counts[kind]}
    report = _sidecar(ns.out, "scrub", {"records": len(lines), "records_changed": len(replaced), "by_kind": by_kind,
                                        "lines_changed": sorted(replaced)})
    mark_files([ns.out, report], command("scrub"))
    listed = ", ".join(f"{kind} {n}" for kind, n in by_kind.items()) or "nothing found"
    print(f"{len(lines)} records, {len(replaced)} changed: {listed} -> {ns.out} (report {report})")
    return 0


def _contamination(ns) -> int:
    if ns.out:
        claim_files([ns.out], command("contamination"), option="--out", inputs=[ns.train, ns.eval],
                    overwrite=ns.overwrite)
    result = find_contamination(read_records(ns.train), read_records(ns.eval), ns.ngram, ns.threshold)
    for o in result.overlaps[:SHOWN]:
        what = "exact copy of" if o.kind == "exact" else f"{o.overlap:.0%} of its {ns.ngram}-grams in train, most at"
        print(f"{ns.eval}:{o.eval_line}: {what} {ns.train}:{o.train_line}")
    if len(result.overlaps) > SHOWN:
        where = f"all in {ns.out}" if ns.out else "--out FILE lists all"
        print(f"... and {len(result.overlaps) - SHOWN} more ({where})")
    exact = sum(o.kind == "exact" for o in result.overlaps)
    summary = {"eval_records": result.eval_records, "contaminated": len(result.overlaps), "exact": exact,
               "ngram": len(result.overlaps) - exact, "rate": round(result.rate, 4), "unchecked": result.unchecked,
               "n": ns.ngram, "threshold": ns.threshold}
    if ns.out:
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        with replacing(ns.out) as tmp:
            tmp.write_text(json.dumps({**summary, "overlaps": [vars(o) for o in result.overlaps]}, indent=2) + "\n")
        mark_files([ns.out], command("contamination"))
    print(f"{len(result.overlaps)} of {result.eval_records} eval examples overlap train (rate {result.rate:.2%}): "
          f"{exact} exact, {len(result.overlaps) - exact} by {ns.ngram}-gram share >= {ns.threshold}"
          + (f"; {result.unchecked} with no {ns.ngram}-gram outside text most records share got the exact check "
             f"only" if result.unchecked else ""))
    return 0


def _split(ns) -> int:
    from ftcluster.data.tools.split import split, split_paths  # not at the top: it imports torch and datasets

    paths = split_paths(ns.file, ns.out)
    for path in paths.values():
        check_output(ns.file, path, "--out")  # the input's own problems first, before the folder is claimed
    claim_folder(ns.out, command("split"), option="--out", inputs=[ns.file], overwrite=ns.overwrite)
    sides = split(ns.file, ns.eval_fraction, ns.seed, ns.out)
    mark_folder(ns.out, command("split"), names=[p.name for p in paths.values()])
    print(", ".join(f"{name}: {count} records -> {path}" for name, (path, count) in sides.items()))
    return 0


def _report_path(out: Path, job: str) -> Path:
    return out.with_name(f"{out.stem}.{job}.json")


def _sidecar(out: Path, job: str, report: dict) -> Path:
    """<out without its extension>.<job>.json beside the output: what was removed or replaced, and counts."""
    path = _report_path(out, job)
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    return path
