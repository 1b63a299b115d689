"""Shared test setup: one compute thread per xdist worker, and tiny models built into a per-session
temporary cache."""

import itertools
import os

# Under `pytest -n N` each worker (and every process it starts: the CLI, torchrun's ranks) gets its share
# of the cores. Left to itself each torch process spins one OpenMP thread per core, and N workers on N
# cores fight for them: the quickstart test ran 31 s alone and 310 s beside a second copy (33 s each with
# one thread). Set before torch is first imported, so the OpenMP pool is sized from it.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_name] = _THREADS

import pytest  # noqa: E402


def pytest_configure(config):
    if _WORKERS > 1:  # in case a plugin imported torch before this file ran
        import torch

        torch.set_num_threads(int(_THREADS))


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory):
    """Point PEFTCLI_CACHE at a fresh directory so tests never read or write the user's cache."""
    old = os.environ.get("PEFTCLI_CACHE")
    os.environ["PEFTCLI_CACHE"] = str(tmp_path_factory.mktemp("peftcli-cache"))
    yield os.environ["PEFTCLI_CACHE"]
    if old is None:
        os.environ.pop("PEFTCLI_CACHE", None)
    else:
        os.environ["PEFTCLI_CACHE"] = old


# -- the fast tier -------------------------------------------------------------------------------------
# `pytest -m "not slow"` must stay under 2 minutes on 2 cores. The big parity tables below run every row
# in the full suite (CI), and only the rows named here in the fast tier: the ones that exercise the most
# code (a composed variant, a tied embedding, a second architecture), so a quick run still touches every
# code path the table covers at least once. A name or row id here that no longer exists is an error, so
# the list cannot go stale.
FAST_ROWS = {
    "test_batching.py::test_packed_window_equals_unpacked": {"lora", "adalora"},
    "test_beft.py::test_peft_loads_our_adapter_with_each_option": {"q-v"},
    "test_beft.py::test_we_load_peft_adapters_with_each_option": {"qwen2"},
    "test_deft.py::test_peft_loads_our_adapter_with_each_option": {"gpt2"},
    "test_deft.py::test_we_load_peft_adapters_with_each_option": {"llama-qr-alpha"},
    "test_glora.py::test_peft_loads_our_adapter_with_each_option": {"qwen2-vector-vector-vector"},
    "test_glora.py::test_we_load_peft_adapters_with_each_option": {"qwen2-lora-lora-constant"},
    "test_lily.py::test_peft_loads_our_adapter_with_each_option": {"regex-one-group-per-shape"},
    "test_lily.py::test_we_load_peft_adapters_with_each_option": {"llama-init_weights-false"},
    "test_lora_inits.py::test_init_equals_peft_for_the_same_seed": {
        "gaussian",
        "orthogonal",
        "pissa_niter",
        "loftq",
    },
    "test_boft.py::test_peft_loads_our_adapter_with_each_option": {
        "block_num-butterfly-3",
        "bert-butterfly-2",
    },
    "test_boft.py::test_we_load_peft_adapters_with_each_option": {"llama-block_num-butterfly-3"},
    "test_c3a.py::test_peft_loads_our_adapter_with_each_option": {"block_size_pattern", "bert"},
    "test_c3a.py::test_we_load_peft_adapters_with_each_option": {"llama-pattern"},
    "test_cpt.py::test_loss_and_logits_equal_peft": {"decay"},
    "test_grpo.py::test_step_one_loss_and_gradients_equal_trl": {"dapo-kl-accum2"},
    "test_delora.py::test_peft_loads_our_adapter_with_each_option": {"patterns"},
    "test_delora.py::test_we_load_peft_adapters_with_each_option": {"llama-patterns"},
    "test_frod.py::test_peft_loads_our_adapter_with_each_option": {"one-block-svd"},
    "test_gralora.py::test_peft_loads_our_adapter_with_each_option": {"k4-alpha"},
    "test_gralora.py::test_we_load_peft_adapters_with_each_option": {"llama-k4-hybrid"},
    "test_hira.py::test_peft_loads_our_adapter_with_each_option": {"gpt2"},
    "test_hira.py::test_we_load_peft_adapters_with_each_option": {"llama"},
    "test_lora_options.py::test_option_round_trips_with_peft": {
        "lora_bias",
        "layers_to_transform",
        "trainable_token_indices-tied",
        "modules_to_save-tied",
    },
    "test_lora_variants.py::test_saved_adapter_loads_in_peft_with_our_logits": {"dora_gpt2", "pissa_dora"},
    "test_lora_variants.py::test_merged_plain_model_reloads_with_the_adapter_logits": {"pissa_dora"},
    "test_lora_variants.py::test_residual_inits_equal_peft_and_compose_with_dora": {"olora_dora"},
    "test_miss.py::test_peft_loads_our_adapter_with_each_option": {"bat", "mini"},
    "test_miss.py::test_we_load_peft_adapters_with_each_option": {"llama-r-24-padded"},
    "test_objectives.py::test_dpo_continues_from_an_sft_adapter_with_it_as_the_start_reference": {"start"},
    "test_objectives.py::test_precomputed_reference_gives_the_same_run": {"base"},
    "test_oft.py::test_peft_loads_our_adapter_with_each_option": {"coft", "block_size-not-dividing"},
    "test_oft.py::test_we_load_peft_adapters_with_each_option": {"llama-coft"},
    "test_peanut.py::test_peft_loads_our_adapter_with_each_option": {"depth-2-gelu-scaling"},
    "test_peanut.py::test_we_load_peft_adapters_with_each_option": {"llama-depth-3-gelu"},
    "test_osf.py::test_peft_loads_our_adapter_with_each_option": {"rank_pattern"},
    "test_osf.py::test_we_load_peft_adapters_with_each_option": {"llama-pattern"},
    "test_psoft.py::test_peft_loads_our_adapter_with_each_option": {"cayley_neumann"},
    "test_psoft.py::test_we_load_peft_adapters_with_each_option": {"llama-pissa-free"},
    "test_quantized_methods.py::test_trains_on_a_4bit_base_loads_in_peft_and_merges": {"vera"},
    "test_randlora.py::test_peft_loads_our_adapter_with_each_option": {"very_sparse-no-saved-projection"},
    "test_randlora.py::test_we_load_peft_adapters_with_each_option": {"llama"},
    "test_road.py::test_peft_loads_our_adapter_with_each_option": {"road_4"},
    "test_road.py::test_we_load_peft_adapters_with_each_option": {"llama-road_1"},
    "test_shadow.py::test_peft_loads_our_adapter_with_each_option": {"narrow-mirror"},
    "test_shira.py::test_peft_loads_our_adapter_with_each_option": {"weight_magnitude"},
    "test_shira.py::test_we_load_peft_adapters_with_each_option": {"llama"},
    "test_vblora.py::test_peft_loads_our_adapter_with_each_option": {"save_only_topk_weights"},
    "test_vblora.py::test_we_load_peft_adapters_with_each_option": {"llama-topk-only"},
    "test_supertuning.py::test_peft_loads_our_adapter_with_each_option": {"supra-alpha-dropout"},
    "test_supertuning.py::test_we_load_peft_adapters_with_each_option": {"llama-bottom-supra"},
    "test_pvera.py::test_peft_loads_our_adapter_with_each_option": {
        "sample_at_inference",
        "gpt2-no-saved-projection",
    },
    "test_pvera.py::test_we_load_peft_adapters_with_each_option": {"llama-no-saved-projection"},
    "test_waveft.py::test_peft_loads_our_adapter_with_each_option": {"db4-scaling", "proportional"},
    "test_waveft.py::test_we_load_peft_adapters_with_each_option": {"llama-db3-seed", "gpt2-no-idwt"},
    "test_tinylora.py::test_peft_loads_our_adapter_with_each_option": {"weight_tying"},
    "test_tinylora.py::test_we_load_peft_adapters_with_each_option": {"llama-tied"},
    "test_unilora.py::test_peft_loads_our_adapter_with_each_option": {"save_indices-bound"},
    "test_unilora.py::test_we_load_peft_adapters_with_each_option": {"llama-seed-length"},
}


# -- the full suite's order under xdist ---------------------------------------------------------------
# xdist hands each worker a first run of consecutive tests, then deals out the rest as workers free up. A
# long test collected late becomes the run's tail (the quickstart alone once kept one worker busy for
# minutes after the other had finished), so the longest tests go first, shared out between the workers'
# first runs. Test-name prefixes, longest first (from `--durations`); a stale name only loses its place.
LONGEST_FIRST = (
    "test_distributed.py::test_sigkill_after_a_checkpoint_then_resume_matches_uninterrupted",
    "test_no_deprecations.py::",
    "test_quickstart.py::",
    "test_gpu.py::test_dry_run_writes_the_whole_report_on_the_cpu",
    "test_fuzz_data.py::test_fuzz_jsonl_lines_long",
    "test_reliability.py::test_second_resume_while_the_first_runs_is_refused",
    "test_speed_paths.py::test_compiled_training_matches_eager",
    "test_errors.py::test_real_console_script_prints_no_traceback",
    "test_fuzz_data.py::test_fuzz_csv_long",
    "test_distributed.py::",
    "test_fuzz_recipe.py::test_recipe_trees_slow",
    "test_soak.py::",
    "test_objectives.py::test_sigkill_then_resume_matches_uninterrupted",
    "test_report.py::test_run_killed_with_sigkill",
    "test_data_stage.py::test_memory_does_not_grow_with_the_number_of_rows",
)


def _longest_first(items: list, workers: int) -> list:
    """``items`` with the LONGEST_FIRST tests dealt in turn to the starts of the workers' first runs
    (xdist's load scheduler gives worker k items [k·c, (k+1)·c) first, c = len(items) // workers // 4)."""

    def rank(item) -> int:
        name = f"{item.path.name}::{item.name}"
        return next((i for i, prefix in enumerate(LONGEST_FIRST) if name.startswith(prefix)), -1)

    long = sorted((item for item in items if rank(item) >= 0), key=rank)
    if not long or len(items) < 2 * workers:
        return items
    rest = iter(item for item in items if rank(item) < 0)
    chunk = max(2, len(items) // workers // 4)
    firsts = [long[k::workers] for k in range(workers)]
    ordered = []
    for k in range(workers):
        ordered += firsts[k]
        ordered += itertools.islice(rest, max(0, chunk - len(firsts[k])))
    return ordered + list(rest)


def pytest_collection_modifyitems(config, items):
    if _WORKERS > 1:
        items[:] = _longest_first(items, _WORKERS)
    seen: dict[str, set[str]] = {}
    for item in items:
        key = f"{item.path.name}::{item.originalname}"
        if key not in FAST_ROWS or not hasattr(item, "callspec"):
            continue
        seen.setdefault(key, set()).add(item.callspec.id)
        if item.callspec.id not in FAST_ROWS[key]:
            item.add_marker(pytest.mark.slow)
    collected_files = {item.path.name for item in items}
    for key, rows in FAST_ROWS.items():
        if key.split("::")[0] not in collected_files:
            continue  # a run of other files
        missing = rows - seen.get(key, set())
        if key not in seen or (missing and not config.option.keyword and not config.option.lf):
            raise pytest.UsageError(
                f"tests/conftest.py FAST_ROWS: {key} {sorted(missing) or ''} not collected"
            )
