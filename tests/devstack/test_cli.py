"""`python -m devstack`: arguments reach `up` and pytest as given."""

import socket
from pathlib import Path

from devstack import __main__ as cli
from devstack.up import DEFAULT_DATA_DIR, up


def test_test_passes_every_argument_to_pytest_untouched(monkeypatch):
    received = []
    monkeypatch.setattr(cli, "run_tests", lambda pytest_args: received.append(pytest_args) or 3)
    assert cli.main(["test", "-k", "upload", "--maxfail=1", "tests/diagnostics"]) == 3
    assert received == [["-k", "upload", "--maxfail=1", "tests/diagnostics"]]


def test_up_takes_a_data_folder_and_a_port(monkeypatch):
    received = []
    monkeypatch.setattr(cli, "up", lambda **options: received.append(options) or 0)
    cli.main(["up"])
    cli.main(["up", "--data-dir", "/tmp/stack-data", "--port", "9000"])
    assert received == [
        {"data_dir": DEFAULT_DATA_DIR, "port": 8000},
        {"data_dir": Path("/tmp/stack-data"), "port": 9000},
    ]


def test_up_refuses_a_busy_port_before_starting_anything(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert up(data_dir=tmp_path / "stack", port=busy.getsockname()[1]) == 2
    assert "in use" in capsys.readouterr().err
    assert not (tmp_path / "stack").exists()
