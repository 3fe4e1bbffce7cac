"""Apply each fault of docs/TEST_FAULTS.md to a scratch worktree, run the tests meant to catch it, record
which fail (one JSON line per fault in /tmp/faultrun/results.jsonl). Never point it at a checkout you work in:
it resets the tree between faults. A SCRATCH path that does not exist is made with
`git worktree add --detach SCRATCH HEAD` (HEAD of the checkout holding this script).

    nice -n 19 python3 scripts/test_faults.py /tmp/faultwt [fault,fault,...]
    python3 scripts/test_faults.py --check        # every fault's `old` text occurs exactly once here
"""
import json, subprocess, sys, time, re, os
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
CHECK = sys.argv[1:2] == ["--check"]
WT = HERE if CHECK else Path(sys.argv[1])
ONLY = sys.argv[2].split(",") if len(sys.argv) > 2 and sys.argv[2] else None
OUT = Path("/tmp/faultrun/results.jsonl")
OUT.parent.mkdir(parents=True, exist_ok=True)

E2E = "tests/test_pipeline_e2e.py::test_method_matches_reference"
BS = "tests/test_config.py::test_build_spec_carries_every_value"

FAULTS = [
 ("weights", "plan.py ignores models[].weight", "pipeline/plan.py",
  "weights=tuple(float(m.weight) for m in cfg.models),", "weights=tuple(1.0 for m in cfg.models),",
  [BS, f"{E2E}[ta_weights_lambda-family]", "tests/test_transformers_load.py"]),
 ("lambda1", "plan.py forces lambda to 1.0", "pipeline/plan.py",
  "lam=float(cfg.lam),", "lam=1.0,", [BS, f"{E2E}[ta_weights_lambda-family]", f"{E2E}[ties_tadrop-family]"]),
 ("tall04", "plan.py forces every TALL lambda to 0.4", "pipeline/plan.py",
  "tall_lambdas=tuple(float(cfg.tall.lambdas.get(n, cfg.tall.default_lambda)) for n in names),",
  "tall_lambdas=tuple(0.4 for n in names),", [BS, f"{E2E}[tall-family]", f"{E2E}[consensus-family]"]),
 ("lam2e5", "the engine's task arithmetic scales by lambda * (1 + 2e-5) (tadrop/methods.py)", "tadrop/methods.py",
  "return _base_plus(base, _sum64(_flat_tasks(taus)), lam, out)",
  "return _base_plus(base, _sum64(_flat_tasks(taus)), lam * (1 + 2e-5), out)",
  [f"{E2E}[ta-family]", f"{E2E}[ta_dare-family]"]),
 ("consensus", "plan.py ignores consensus.k_min and alpha", "pipeline/plan.py",
  "consensus_k_min=int(cfg.consensus.k_min),\n        consensus_alpha=float(cfg.consensus.alpha),",
  "consensus_k_min=2,\n        consensus_alpha=0.3,", [BS, f"{E2E}[consensus_ties-family]", f"{E2E}[consensus-family]"]),
 ("cons_inner", "plan.py ignores tall.inner", "pipeline/plan.py",
  "tall_inner=cfg.tall.inner,", "tall_inner='task_arithmetic',", [BS, f"{E2E}[tall_ties-family]"]),
 ("cons_inner2", "plan.py ignores consensus.inner", "pipeline/plan.py",
  "consensus_inner=cfg.consensus.inner,", "consensus_inner='task_arithmetic',",
  [BS, f"{E2E}[consensus_ties-family]"]),
 ("eps", "plan.py drops sparsify.eps (TADrop default 1e-12)", "pipeline/plan.py",
  "phi = TADrop(a=s.a, b=s.b, eps=s.eps,", "phi = TADrop(a=s.a, b=s.b,", [BS, f"{E2E}[ta_tadrop_params-family]"]),
 ("density", "plan.py ignores sparsify.density", "pipeline/plan.py",
  "phi = TopK(density=s.density, scope=s.scope)", "phi = TopK(density=0.2, scope=s.scope)",
  [BS, f"{E2E}[ties_topk_density-family]"]),
 ("topk_scope", "plan.py ignores the top-k scope", "pipeline/plan.py",
  "phi = TopK(density=s.density, scope=s.scope)", "phi = TopK(density=s.density)",
  [BS, f"{E2E}[ties_topk_model-family]"]),
 ("seed", "plan.py ignores the run seed for DARE", "pipeline/plan.py",
  "phi = DARE(p=s.p, seed=cfg.seed)", "phi = DARE(p=s.p, seed=0)", [BS, f"{E2E}[ta_dare-family]"]),
 ("rescaler", "plan.py ignores emr.rescaler", "pipeline/plan.py",
  "emr_rescaler=cfg.emr.rescaler,", "emr_rescaler='official',", [BS, f"{E2E}[emr_global-family]"]),
 ("unified_dtype", "plan.py ignores unified_dtype (unified/ as merged/)", "pipeline/plan.py",
  "unified_dtypes = {n: cfg.unified_dtype or d for n, d in merged_dtypes.items()}",
  "unified_dtypes = dict(merged_dtypes)", [f"{E2E}[tall_ties-family]"]),
 ("output_dtype", "plan.py ignores output_dtype", "pipeline/plan.py",
  "merged_dtypes[name] = cfg.output_dtype or _DTYPE_NAMES[base.tensors[name].dtype]",
  "merged_dtypes[name] = _DTYPE_NAMES[base.tensors[name].dtype]",
  [f"{E2E}[ta_passthrough_bf16-family]", f"{E2E}[emr_global-family]"]),
 ("passthrough", "run.py ignores passthrough patterns", "pipeline/run.py",
  "table = validate_inputs(base, models, cfg.passthrough,", "table = validate_inputs(base, models, [],",
  [f"{E2E}[ta_passthrough_bf16-family]", "tests/test_bad_inputs.py::test_missing_tensor_allowed_by_passthrough"]),
 ("copy_zeros", "a passthrough tensor is written as zeros instead of the base's bytes (job.py _copy)", "pipeline/job.py",
  "self.merged_writer.write(name, view.contiguous())", "self.merged_writer.write(name, torch.zeros_like(view))",
  ["tests/test_bad_inputs.py::test_missing_tensor_allowed_by_passthrough", f"{E2E}[ta_passthrough_bf16-family]"]),
 ("drop_rate_f32", "TADrop's drop rate stored rounded to float32 (tadrop/sparsify.py)", "tadrop/sparsify.py",
  "return SparsifyStats(numel=n, q_a=qa, q_b=qb, drop_rate=rate,",
  "return SparsifyStats(numel=n, q_a=qa, q_b=qb, drop_rate=float(torch.tensor(rate, dtype=torch.float32)),",
  [f"{E2E}[ta_tadrop-family]"]),
 ("msg_truncated", "the truncated-file error loses the word 'truncated'", "pipeline/checkpoints.py",
  'f"{where}: truncated file: data ends at byte "', 'f"{where}: data ends at byte "',
  ["tests/test_bad_inputs.py::test_truncated_file"]),
 ("msg_duplicate", "the duplicate task name error loses its meaning ('invalid name')", "pipeline/config.py",
  'raise ValueError(f"models.{i}.name: duplicate task name {n!r} "', 'raise ValueError(f"models.{i}.name: invalid name "',
  ["tests/test_bad_inputs.py::test_duplicate_task_names"]),
 ("msg_budget", "the row-too-large-for-the-budget error stops naming the tensor", "tadrop/streamed.py",
  "raise ValueError(f\"tensor {name or '?'} {tuple(shape)}: one row",
  "raise ValueError(f\"tensor ? {tuple(shape)}: one row", ["tests/test_bad_inputs.py::test_memory_budget_too_small_for_one_row"]),
 ("msg_validate_model", "input-mismatch problems stop naming the model at fault", "pipeline/checkpoints.py",
  None, None, ["tests/test_checkpoints.py::test_validate_errors"]),
 ("scope_resume", "model-scope resume merges only the pass files of jobs run since the restart", "pipeline/run.py",
  '    _run_phase(executor, ctx, plan.jobs["global_hi"], ledger, done, progress)\n    sels = merge_selector_files([ctx.state_dir / done[j.id]["file"] for j in plan.jobs["global_hi"]], k)',
  '    before = set(done)\n    _run_phase(executor, ctx, plan.jobs["global_hi"], ledger, done, progress)\n    sels = merge_selector_files([ctx.state_dir / done[j.id]["file"] for j in plan.jobs["global_hi"] if j.id not in before] or [ctx.state_dir / done[plan.jobs["global_hi"][0].id]["file"]], k)',
  ["tests/test_resume_model_scope.py::test_local_sigkill_in_model_scope_passes[after_job:3]",
   "tests/test_resume_model_scope.py::test_ray_sigkill_in_model_scope_passes[after_job:3]"]),
 ("scope_wipe", "model-scope resume starts from an empty .tadrop/global/ (the ledgered pass files are lost)", "pipeline/run.py",
  "    gdir.mkdir(exist_ok=True)\n", "    import shutil; shutil.rmtree(gdir, ignore_errors=True)\n    gdir.mkdir(exist_ok=True)\n",
  ["tests/test_resume_model_scope.py::test_local_sigkill_in_model_scope_passes[global_values]"]),
 ("budget", "plan.py ignores memory_budget (one piece per tensor)", "pipeline/plan.py",
  "engine_budget = budget - min(RUNTIME_RESERVE, budget // 4)", "engine_budget = 1 << 40",
  ["tests/test_memory.py", "tests/test_pipeline_e2e.py::test_row_chunking_gives_identical_bytes[emr_tadrop]"]),
 ("engine_chunks", "the engine ignores the planned chunk rows (whole tensor in one read)", "tadrop/streamed.py",
  "    cr = max(1, min(plan.chunk_rows, rows))\n", "    cr = rows\n", ["tests/test_memory.py"]),
 ("sum64_tensors", "float64 block sums kept as small CPU tensors across a tensor's chunks (EMR workers grow "
  "with the tensor: the C heap is pinned between the chunks' temporaries)", "tadrop/_buffers.py",
  "            self._parts.extend(sums.tolist())\n", "            self._parts.append(sums)\n",
  ["tests/test_memory.py"]),
 ("oom_always", "a SIGKILLed worker is blamed on the OOM killer whenever the counters are readable",
  "pipeline/executor.py", "    if grew:\n", "    if oom_after:\n", ["tests/test_death_cause.py"]),
 ("mk_tokenizer", "a mergekit tokenizer_source is dropped (the merge keeps the base's vocabulary)",
  "pipeline/mergekit_config.py",
  '        cfg["tokenizer_source"] = tok_choice if tok_choice == "union" else cfg["models"][tok_choice]["name"]\n',
  "        pass\n",
  ["tests/test_mergekit_config.py::test_tokenizer_source_translates",
   "tests/test_vocab.py::test_mergekit_tokenizer_source_through_the_cli"]),
 ("stats_row", "the engine returns one stats row too few per tensor (tadrop/streamed.py)", "tadrop/streamed.py",
  None, None, ["tests/test_streamed.py::test_engine_matches_reference"]),
 ("workerlost", "WorkerLost is not among the CLI's known errors (traceback)", "pipeline/cli.py",
  "return (ConfigError, CheckpointError, PlanError, RunError, JobError, WorkerLost, ExportError, OSError,",
  "return (ConfigError, CheckpointError, PlanError, RunError, JobError, ExportError, OSError,",
  ["tests/test_resume_model_scope.py::test_worker_killed_after_writing_its_histogram_file"]),
 ("ctrlc", "Ctrl-C exits 1 instead of 130", "pipeline/cli.py",
  "        return 130\n", "        return 1\n", ["tests/test_cli_misuse.py::test_ctrl_c_exits_130_and_the_same_command_resumes"]),
 ("status_keyerror", "status on a run.json without run_id raises (traceback) instead of exit 2", "pipeline/run.py",
  "    except (integrity.StateError, KeyError):\n        print(f\"{run_dir}: not a tadrop run",
  "    except integrity.StateError:\n        print(f\"{run_dir}: not a tadrop run",
  ["tests/test_cli_misuse.py::test_status_of_things_that_are_not_runs"]),
 ("report_missing", "report on a directory without stats.parquet fails with a raw KeyError", "pipeline/report.py",
  '        raise FileNotFoundError(f"{path}: no stats table (is {run_dir} a finished tadrop run?)")',
  '        raise KeyError(str(path))', ["tests/test_cli_misuse.py::test_report_of_things_that_are_not_finished_runs"]),
]


# faults whose old/new text is easier to keep apart
EXTRA = {'msg_validate_model': {'old': 'problems.append(f"tensor {name!r}: missing in model(s) {\', \'.join(missing)}")', 'new': 'problems.append(f"tensor {name!r}: missing in {len(missing)} model(s)")'}, 'stats_row': {'old': '                for k in range(K)]\n    if spec.method == "emr":', 'new': '                for k in range(K - 1)]\n    if spec.method == "emr":'}}


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=True, cwd=WT, capture_output=True, text=True, **kw)


def check() -> int:
    """Every fault's `old` text must occur exactly once in this checkout, or the fault tests nothing."""
    bad = 0
    for fid, _, path, old, _, _ in FAULTS:
        old = EXTRA.get(fid, {}).get("old", old)
        n = (HERE / path).read_text().count(old) if old else 0
        if n != 1:
            bad += 1
            print(f"{fid}: `old` text occurs {n} times in {path}")
    print(f"{len(FAULTS) - bad}/{len(FAULTS)} faults apply")
    return 1 if bad else 0


def main():
    if not WT.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(WT), "HEAD"], cwd=HERE, check=True)
    extra = EXTRA
    order = {f: i for i, f in enumerate(ONLY or [])}
    faults = sorted((f for f in FAULTS if not ONLY or f[0] in order), key=lambda f: order.get(f[0], 0))
    if ONLY and "baseline" in ONLY:     # the same tests on the unchanged tree: they must all pass
        tests = sorted({t for f in faults for t in EXTRA.get(f[0], {}).get("tests", f[5])})
        faults.insert(0, ("baseline", "no fault (the unchanged tree)", None, None, None, tests))
    for fid, what, path, old, new, tests in faults:
        if fid in extra:
            old, new = extra[fid]["old"], extra[fid]["new"]
            tests = extra[fid].get("tests", tests)
        sh("git checkout -- . && git clean -fdq pipeline tadrop")
        if path is not None:
            f = WT / path
            s = f.read_text()
            if old is None or s.count(old) != 1:
                rec = {"fault": fid, "error": f"pattern not found exactly once in {path}"}
                print(rec, flush=True)
                OUT.open("a").write(json.dumps(rec) + "\n")
                continue
            f.write_text(s.replace(old, new, 1))
        diff = sh("git diff").stdout
        t0 = time.time()
        env = {**os.environ, "PYTHONPATH": str(WT)}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *tests],
                              cwd=WT, capture_output=True, text=True, env=env, timeout=1500)
        failed = re.findall(r"^FAILED (\S+)", proc.stdout, re.M)
        summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
        rec = {"fault": fid, "what": what, "file": path, "diff": diff, "tests": tests, "failed": failed,
               "summary": summary, "seconds": round(time.time() - t0), "tail": proc.stdout[-4000:]}
        print(json.dumps({k: rec[k] for k in ("fault", "failed", "summary", "seconds")}), flush=True)
        with OUT.open("a") as fo:
            fo.write(json.dumps(rec) + "\n")
    sh("git checkout -- .")


sys.exit(check()) if CHECK else main()
