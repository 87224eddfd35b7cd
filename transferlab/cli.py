"""The `transferlab` console command: thin over `transferlab.provenance.review` and `transferlab.provenance.audit`.

    transferlab review [--base main] [--rev REV] [--md] [--fail-on-regression]
    transferlab audit <champion | models/<strategy> | strategy | mlflow-run-id | git-rev> [--reevaluate] [--md]

Exit codes: 0 ok; 1 a regression beyond noise (review --fail-on-regression) or an audit mismatch;
2 a usage or input error (unknown revision, nothing to audit), with what to do. Heavy libraries (pandas,
MLflow, torch) are imported only by the subcommand that needs them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

EXIT_OK, EXIT_FOUND, EXIT_USAGE = 0, 1, 2

log = logging.getLogger("transferlab")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="transferlab",
        description="Review a pull request's results against a base revision, or audit where a number came from.",
        epilog="exit codes: 0 ok, 1 regression beyond noise / audit mismatch, 2 usage or input error",
    )
    p.add_argument("-C", "--repo", default=".", help="run as if started in this folder (default: .)")
    sub = p.add_subparsers(dest="command", metavar="{review,audit}")

    r = sub.add_parser(
        "review",
        help="compare the working tree (or --rev) with a base: metrics, per-strategy changes with bootstrap "
        "intervals, params, stages rerun",
        description="Compare the working tree (or --rev) with --base. Each strategy's change in test accuracy and "
        "macro F1 gets a bootstrap interval over test samples and training seeds, from the two revisions' "
        "per-sample predictions (the base's fetched from the DVC cache by its dvc.lock md5).",
    )
    r.add_argument("--base", default="main", help="git revision to compare against (default: main)")
    r.add_argument("--rev", default=None, help="git revision under review (default: the working tree)")
    r.add_argument("--md", action="store_true", help="Markdown for a pull-request comment")
    r.add_argument("--fail-on-regression", action="store_true", help="exit 1 when a drop is beyond noise")
    r.add_argument("--n-bootstrap", type=int, default=2000, help="bootstrap resamples (default: 2000)")
    r.add_argument("--confidence", type=float, default=0.95, help="interval level (default: 0.95)")
    r.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")

    a = sub.add_parser(
        "audit",
        help="verify the chain commit -> dvc.lock -> MLflow run -> files on disk for a model or a number",
        description="Verify every hash from a commit to the files on disk: dvc.lock's md5s, the provenance "
        "record in runs/, the MLflow run's tags, metrics and model artifact. Exit 1 on any mismatch.",
    )
    a.add_argument(
        "target",
        help="champion (metrics/summary.json's recommendation), models/<strategy>, a strategy name, an MLflow "
        "run id, or a git revision (audits every strategy in its dvc.lock)",
    )
    a.add_argument("--reevaluate", action="store_true", help="reload the model and recompute its test metrics")
    a.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: params.yaml tracking.uri)")
    a.add_argument("--params", default="params.yaml", help="params file for --reevaluate (default: params.yaml)")
    a.add_argument("--prepared", default="data/prepared", help="prepared data for --reevaluate")
    a.add_argument("--md", action="store_true", help="Markdown output")
    return p


def _review(args: argparse.Namespace) -> int:
    from transferlab.provenance import review as rv_mod

    result = rv_mod.review(
        args.repo, args.base, args.rev, n_bootstrap=args.n_bootstrap, confidence=args.confidence, seed=args.seed
    )
    sys.stdout.write(rv_mod.to_markdown(result) if args.md else rv_mod.to_text(result))
    return EXIT_FOUND if args.fail_on_regression and result.regressions() else EXIT_OK


def _audit(args: argparse.Namespace) -> int:
    from transferlab.provenance import audit as au

    report = au.audit(args.repo, args.target, uri=args.tracking_uri)
    if args.reevaluate:
        from transferlab.provenance.revisions import WORKSPACE, read_json, repo_root

        root = repo_root(args.repo)
        for a in report.audits:
            if a.rev != "workspace":
                a.add(
                    "--reevaluate",
                    "working tree",
                    "skipped",
                    "re-evaluation needs the model on disk: check out the rev",
                )
                continue
            recomputed = au.reevaluate(root, a.strategy, args.params, args.prepared)
            au.check_reevaluation(a, recomputed, read_json(root, WORKSPACE, f"metrics/eval/{a.strategy}.json"))
    sys.stdout.write(au.to_text(report, markdown=args.md))
    return EXIT_OK if report.ok else EXIT_FOUND


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `transferlab` command; returns the exit code."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    logging.basicConfig(
        level=os.environ.get("TRANSFERLAB_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s"
    )
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    from transferlab.provenance.revisions import RevisionError

    known: tuple[type[BaseException], ...] = (RevisionError, FileNotFoundError, ValueError)
    try:
        if args.command == "review":
            return _review(args)
        from transferlab.provenance.audit import AuditError

        known = (*known, AuditError)
        return _audit(args)
    except known as exc:
        print(f"transferlab {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
