"""Helpers shared by test modules (imported as `from helpers import ...`)."""
from invbench.cli import main


def invoke(args, capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err
