# FSDP on two GPUs: a run killed (SIGKILL) after a mid-stage checkpoint and resumed, beside the same run
# uninterrupted; prints both runs' train steps and final evaluations. On a machine with 2 GPUs:
#     bash benchmarks/fsdp_resume.sh [WORKDIR]        (default /tmp/fsdp_resume)
# The 76M gpu_single preset with a short warm-up, one 20-step GRPO stage, checkpoints every 5 steps.
set -o pipefail
W=${1:-/tmp/fsdp_resume}; rm -rf "$W"; mkdir -p "$W"
cat > "$W/run.yaml" <<'YAML'
extends: gpu_single
run: {name: fsdp_resume, checkpoint_every: 5, keep_checkpoints: 10, report: false}
warmup: {steps: 60}
distributed: {strategy: fsdp}
method: {prompts_per_step: 64}
eval: {domains: [gcd, arithmetic], num_prompts: 128, every: 0}
stages: [{domain: gcd, steps: 20}]
YAML
TR="python -m torch.distributed.run --nproc_per_node 2 --master_port 29581 -m cptlab run"
t0=$(date +%s)
$TR "$W/run.yaml" --out "$W/full" > "$W/full.log" 2>&1 || { echo "uninterrupted run failed: $W/full.log"; exit 1; }
echo "uninterrupted: $(( $(date +%s) - t0 )) s"
t0=$(date +%s)
setsid $TR "$W/run.yaml" --out "$W/killed" > "$W/killed.log" 2>&1 &
for _ in $(seq 300); do sleep 1; [ -d "$W/killed/checkpoints/stage1-step10" ] && break; done
sleep 2; pkill -9 -f -- "--out $W/killed"; sleep 3
echo "killed after $(( $(date +%s) - t0 )) s with checkpoints: $(ls "$W/killed/checkpoints" | tr '\n' ' ')"
$TR --resume "$W/killed" >> "$W/killed.log" 2>&1 || { echo "resume failed: $W/killed.log"; exit 1; }
python - "$W" <<'PY'
import json, sys
for name in ("full", "killed"):
    rows = [json.loads(line) for line in open(f"{sys.argv[1]}/{name}/metrics.jsonl")]
    train = [r for r in rows if r["event"] == "train"]
    final = {r["domain"]: r["greedy_acc"] for r in rows if r["event"] == "eval" and r.get("final")}
    print(f"{name:7s} train steps {[r['step'] for r in train]} final greedy accuracy {final}")
PY
