"""The router's view of the model (tokenizer, model id, config) imports without torch."""

from __future__ import annotations

import subprocess
import sys


def run_fresh(*lines: str) -> str:
    """Run ``lines`` in a new interpreter (this one has torch loaded already); its stdout, stripped."""
    out = subprocess.run([sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_router_tokenize_and_the_torch_free_model_modules_do_not_import_torch():
    assert run_fresh(
        "import sys, router.tokenize, workers.model, workers.model.checkpoint, workers.model.config, "
        "workers.model.demo, workers.model.tokenizer",
        "from router.tokenize import PromptEncoder",
        "enc = PromptEncoder('demo', 16)",
        "assert enc.encode('hi') == [256, 104, 105] and enc.model_id == 'demo' and enc.info.max_context == 4096",
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))",
    ) == "[]"


def test_the_torch_names_of_workers_model_load_on_first_use():
    assert run_fresh(
        "import sys, workers.model",
        "assert 'torch' not in sys.modules",
        "from workers.model import KVCache, load_model",
        "from workers.model.kv_cache import KVCache as K",
        "assert KVCache is K and 'torch' in sys.modules",
        "try:",
        "    workers.model.nothing",
        "except AttributeError as exc:",
        "    print(exc)",
    ) == "module 'workers.model' has no attribute 'nothing'"
