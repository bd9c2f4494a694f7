"""The ``anybit`` command line: generate with a prompt file (batched), errors, help."""

from __future__ import annotations

import json

import pytest

from anybit.cli import main
from tests.model_factory import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("cli_model"), arch="mistral")


def test_generate_prompt_file_batched(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def fibonacci(n):\nThe quick brown fox\nhéllo\n")
    rc = main(["generate", model_dir, "--prompt-file", str(prompts), "--max-tokens", "5", "--json",
               "--device", "cpu", "--dtype", "float32"])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["prompt"] for x in lines] == ["def fibonacci(n):", "The quick brown fox", "héllo"]
    assert all(1 <= len(x["token_ids"]) <= 5 for x in lines)


def test_generate_stream_and_seed(model_dir, capsys):
    args = ["generate", model_dir, "--prompt", "for i in", "--max-tokens", "6", "--temperature", "0.9",
            "--seed", "3", "--device", "cpu"]
    assert main(args + ["--stream"]) == 0
    streamed = capsys.readouterr().out
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(streamed.rstrip("\n"))


def test_generate_errors(model_dir, tmp_path, capsys):
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", model_dir, "--prompt", "x", "--temperature", "-2", "--device", "cpu"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main(["generate", model_dir, "--device", "cpu"]) == 2
    assert "--prompt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", model_dir, "--kv-cache-dtype"])


def test_bench_prints_json_rows(model_dir, capsys):
    assert main(["bench", model_dir, "--batch", "1", "2", "--prompt-len", "8", "--gen", "4", "--repeats", "1",
                 "--json", "--device", "cpu"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["total_tok_s"] > 0 and r["decode_tok_s"] > 0 for r in rows)
    assert main(["bench", model_dir, "--prompt-len", "600", "--device", "cpu"]) == 2
    assert "max_model_len" in capsys.readouterr().err
