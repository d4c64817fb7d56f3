"""examples/quickstart.ipynb runs top to bottom in a fresh Jupyter kernel on the CPU, as a user would
run it (the install cell finds this checkout and skips itself), and its fine-tuning lowers the loss."""

import json
import os
import re
from pathlib import Path

import nbclient
import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "examples" / "quickstart.ipynb"
STEP_LINE = re.compile(r"^step\s+(\d+)\s+loss\s+([0-9.]+)$", re.MULTILINE)


def cell_text(cell) -> str:
    """What a code cell printed (stdout and stderr streams, plus text results)."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data") and "text/plain" in out.data:
            parts.append(out.data["text/plain"])
    return "".join(parts)


def the_cell(nb, marker: str):
    cells = [c for c in nb.cells if c.cell_type == "code" and marker in c.source]
    assert len(cells) == 1, f"expected one code cell containing {marker!r}, found {len(cells)}"
    return cells[0]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook after running every cell in a temporary directory; a cell that raises fails here."""
    workdir = tmp_path_factory.mktemp("quickstart")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel is its own process: it must import ktjax from this checkout, on the CPU.
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=False,
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute(cwd=str(workdir), env=env)
    return nb, workdir


def test_every_cell_runs_without_error(executed):
    nb, _ = executed
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.execution_count is not None, f"cell not run:\n{cell.source}"
            assert not [o for o in cell.outputs if o.output_type == "error"], f"cell raised:\n{cell.source}"


def test_install_cell_skips_itself_when_ktjax_imports(executed):
    nb, _ = executed
    assert "already installed: skipping" in cell_text(the_cell(nb, "REPO_URL ="))


def test_kernel_loads_the_embedded_model_of_this_checkout(executed):
    nb, _ = executed
    assert f"LoadedModel({REPO / 'ktjax' / 'models' / 'tiny'}:" in cell_text(the_cell(nb, "model = ktjax.load("))


def test_generation_and_streaming_print_text(executed):
    nb, _ = executed
    assert cell_text(the_cell(nb, "ktjax.generate(model, \"def fibonacci")).strip()
    assert cell_text(the_cell(nb, "ktjax.stream(")).strip()


def test_placement_plan_offloads_experts_under_a_small_budget(executed):
    nb, _ = executed
    text = cell_text(the_cell(nb, "ktjax.plan_placement("))
    cfg = json.loads((REPO / "ktjax" / "models" / "tiny" / "config.json").read_text())
    experts = (cfg["num_hidden_layers"] - cfg["first_k_dense_replace"]) * cfg["n_routed_experts"]
    assert f"1GiB: {experts} routed experts on the device, 0 in host memory" in text
    # 338MiB holds the core and some experts: the table shows both places.
    assert re.search(r"^routed_experts \(\d+, bf16\)\s+device", text, re.MULTILINE)
    assert re.search(r"^routed_experts \(\d+, bf16\)\s+pinned_host", text, re.MULTILINE)
    assert "refused:" in text and "too small" in text  # the 60MiB budget cannot hold the core


def test_finetuning_lowers_the_loss(executed):
    nb, workdir = executed
    steps = [(int(s), float(loss)) for s, loss in STEP_LINE.findall(cell_text(the_cell(nb, "ktjax.finetune(")))]
    numbers, losses = [s for s, _ in steps], [loss for _, loss in steps]
    assert len(steps) >= 5 and numbers[0] == 1 and numbers == sorted(set(numbers)), f"step lines: {steps}"
    assert losses[-1] < 0.5 * losses[0], f"loss did not fall: {steps}"
    assert (workdir / "adapter" / "adapter_config.json").is_file()
    assert (workdir / "adapter" / "adapter_model.safetensors").is_file()


def test_reloaded_adapter_generates(executed):
    nb, _ = executed
    text = cell_text(the_cell(nb, "adapter=tuning.output"))
    assert re.search(r"^base: .+", text, re.MULTILINE) and re.search(r"^tuned: .+", text, re.MULTILINE)
