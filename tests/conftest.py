import pytest
import torch

# Helper modules the tests import: their asserts get pytest's detailed failure messages too.
pytest.register_assert_rewrite("same_run")

# One intra-op thread: the suite's networks are small, and OpenMP threads that spin while the emulator's
# thread (or another process) holds the second core slow small ops down by orders of magnitude.
torch.set_num_threads(1)


def pytest_terminal_summary(terminalreporter):
    """Print the tables tests leave with ``record_property("summary", (title, row))`` (e.g. the CartPole
    steps-to-solve of every variant), one block per title, after pytest's own summary."""
    tables: dict[str, list[str]] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            for name, value in getattr(report, "user_properties", ()):
                if name == "summary" and getattr(report, "when", "call") == "call":
                    tables.setdefault(value[0], []).append(value[1])
    for title, rows in tables.items():
        terminalreporter.write_line("")
        terminalreporter.write_line(title)
        for row in rows:
            terminalreporter.write_line("  " + row)
