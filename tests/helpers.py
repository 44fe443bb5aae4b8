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


def spy_on_attacks(monkeypatch) -> list[int]:
    """Record the prompt indices every attack is actually run on (to show that resumes skip work)."""
    from invbench import runner

    attacked: list[int] = []
    original = runner.attack_pending

    def spy(attack, leak, *args, done, **kwargs):
        attacked.extend(p.index for p in leak.prompts if p.index not in done)
        return original(attack, leak, *args, done=done, **kwargs)

    monkeypatch.setattr(runner, "attack_pending", spy)
    return attacked
