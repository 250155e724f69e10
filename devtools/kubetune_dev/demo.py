"""`make demo`: a real fine-tune on a throwaway dev cluster (real control plane, fake GPU
pools, real kubelets on containerd, MinIO), start to finish:

1. the seed examples are applied and the real scheduler places them on their GPU pools;
2. SmolLM2-135M-Instruct and the text-to-SQL data are uploaded to MinIO, and
   examples/quickstart.yaml is applied: the trainer image (the one NVIDIA users get, on
   its cpu backend) runs under a real kubelet on a spot runner node;
3. mid-training the node is drained with `kubectl drain` (as a spot reclaim would): the
   trainer checkpoints on SIGTERM, the job is Preempted, the next attempt resumes from
   that step on another node;
4. the job finishes: final status, the held-out exact match before and after, and where
   the adapter is."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from kubetune.api import GROUP, PLURAL, VERSION
from kubetune.gang import GANG_GATE
from kubetune_dev.crd import ADAPTER_CRD_FILE, CRD_FILE
from kubetune_dev.devcluster.cluster import REPO_ROOT, DevCluster, repo_pythonpath
from kubetune_dev.devcluster.minio import upload_tree
from kubetune_dev.devcluster.nodes import GKE_SPOT_LABEL, NVIDIA_GPU, RUNNER_LABEL
from kubetune_dev.devcluster.procs import spawn, stop_group, wait_for
from kubetune_dev.devcluster.tools import tool_binary

TOUR = (
    "text-to-sql-intel.yaml",
    "llama2-chat-guanaco-spot.yaml",
    "falcon-7b-faq.yaml",
    "phi2-toxic-spot-t4.yaml",
    "multi-worker.yaml",
)
DATA = REPO_ROOT / "examples" / "data" / "text-to-sql"
EVICT_AT_STEP = 23  # between two periodic checkpoints: the SIGTERM checkpoint is what saves the work


def say(text: str) -> None:
    print(text, flush=True)


def run(workdir: Path | None = None) -> int:
    from kubernetes import client, config

    from kubetune_dev.local_models import cached_smollm2

    t_demo = time.monotonic()
    workdir = workdir or Path(tempfile.mkdtemp(prefix="kubetune-demo-"))
    model_dir = cached_smollm2()
    with DevCluster(workdir) as cluster:
        kubeconfig = str(cluster.endpoints.kubeconfig)
        api = config.new_client_from_config(kubeconfig)
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        kubectl = [str(tool_binary("kubectl")), "--kubeconfig", kubeconfig]
        tour_nodes(core)
        for crd in (CRD_FILE, ADAPTER_CRD_FILE):
            subprocess.run([*kubectl, "apply", "-f", str(crd)], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(
            [*kubectl, "wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        env = {
            **cluster.env(),
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": repo_pythonpath(),
        }
        for secret in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.pop(secret)  # the operator never needs S3 credentials
        operator = spawn(
            [
                sys.executable,
                "-m",
                "kubetune",
                "run",
                "--metrics-port",
                "0",
                "--progress-interval",
                "2",
            ],
            workdir / "logs" / "operator.log",
            env=env,
        )
        try:
            tour_placement(core, custom)
            finetune(cluster, core, custom, kubectl, model_dir)
        finally:
            stop_group(operator)
        say(
            f"\nLogs: {workdir / 'logs'} (operator, control plane, kubelets) and {workdir / 'pod-logs'} (pods)."
        )
        say(f"Demo done in {time.monotonic() - t_demo:.0f} s. Stopping the dev cluster.")
    return 0


def tour_nodes(core) -> None:
    say("\nNode pools of the dev cluster:")
    for n in core.list_node().items:
        labels, cap = n.metadata.labels, n.status.capacity or {}
        gpus = cap.get(NVIDIA_GPU) or cap.get("gpu.intel.com/i915") or "-"
        product = labels.get("nvidia.com/gpu.product") or labels.get("gpu.intel.com/product") or "cpu"
        kind = "kubelet + containerd (runs pods for real)" if labels.get(RUNNER_LABEL) else "kwok (fake)"
        spot = labels.get(GKE_SPOT_LABEL, "false")
        say(f"  {n.metadata.name:22} {product:32} gpus={gpus:3} spot={spot:5} {kind}")


def tour_placement(core, custom) -> None:
    say("\n1. The seed examples (kubectl apply -f examples/...), placed by the real kube-scheduler:")
    names = []
    for example in TOUR:
        job = yaml.safe_load((REPO_ROOT / "examples" / example).read_text())
        custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, job)
        names.append(job["metadata"]["name"])

    def status(name):
        return custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, name).get("status", {})

    waiting = ("Unschedulable", "WaitingForCapacity")  # the scheduler's refusal, or a gang held back
    wait_for(
        lambda: all(status(n).get("phase") == "Running" or status(n).get("reason") in waiting for n in names),
        90,
        "every seed job Running or waiting for nodes",
    )
    for pod in sorted(core.list_namespaced_pod("default").items, key=lambda p: p.metadata.name):
        if not pod.spec.node_name:
            gated = any(g.name == GANG_GATE for g in pod.spec.scheduling_gates or [])
            why = "held at the gang gate until every worker fits" if gated else "no node has the GPUs free"
            say(f"  {pod.metadata.name:26} -> (pending: {why})")
            continue
        labels = core.read_node(pod.spec.node_name).metadata.labels
        product = labels.get("nvidia.com/gpu.product") or labels.get("gpu.intel.com/product")
        spot = "spot" if labels.get(GKE_SPOT_LABEL) else "on-demand"
        say(f"  {pod.metadata.name:26} -> {pod.spec.node_name:22} {product} ({spot})")
    for name in names:
        st = status(name)
        if st.get("reason") in waiting:
            say(f"  {name}: {st['reason']}: {st['message'][:200]}")
    for name in names:  # the fake GPU jobs have made their point
        custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, name)


def finetune(cluster, core, custom, kubectl, model_dir: Path) -> None:

    job = yaml.safe_load((REPO_ROOT / "examples" / "quickstart.yaml").read_text())
    method = job["spec"].get("method", "qlora")
    say(
        f"\n2. A real fine-tune: SmolLM2-135M-Instruct, {'QLoRA' if method == 'qlora' else 'LoRA'} on "
        "text-to-SQL, on a spot runner node."
    )
    s3 = cluster.s3_client()
    for bucket in ("models", "datasets", "runs"):
        s3.create_bucket(Bucket=bucket)
    n = upload_tree(s3, "models", "SmolLM2-135M-Instruct", model_dir)
    m = upload_tree(s3, "datasets", "text-to-sql", DATA)
    say(
        f"  uploaded to MinIO: s3://models/SmolLM2-135M-Instruct/ ({n} files), s3://datasets/text-to-sql/ ({m} shards)"
    )
    ep = cluster.endpoints
    core.create_namespaced_secret("default", cluster.s3_secret("s3-credentials"))
    job["spec"]["storage"]["endpoint"] = ep.s3
    custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, job)
    say("  kubectl apply -f examples/quickstart.yaml (storage.endpoint set to this MinIO)\n")

    def status() -> dict:
        return custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "quickstart").get(
            "status", {}
        )

    watch = Watch(status)
    st = watch.until(
        lambda s: (s.get("progress") or {}).get("step", 0) >= EVICT_AT_STEP, 900, "training to pass step 23"
    )

    pod = f"quickstart-a{st['attempt']}-w0"
    node = core.read_namespaced_pod(pod, "default").spec.node_name
    say(f"\n3. Node {node} is reclaimed (as a spot VM would be): kubectl drain {node}")
    # the Eviction API, grace periods and all, as a node drain before a reclaim does it
    subprocess.run(
        [*kubectl, "drain", node, "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=120s"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    st = watch.until(
        lambda s: s.get("attempt", 1) >= 2 and s.get("phase") == "Running", 300, "the resumed attempt"
    )
    ckpt = st.get("lastCheckpoint") or {}
    where = core.read_namespaced_pod(f"quickstart-a{st['attempt']}-w0", "default").spec.node_name
    say(
        f"  -> attempt {st['attempt']} running on {where}; "
        f"preemptions {st['preemptions']}, failures {st['failures']}; resuming from the SIGTERM checkpoint "
        f"of step {ckpt.get('step')} ({ckpt.get('uri')})\n"
    )
    st = watch.until(lambda s: s.get("phase") in ("Succeeded", "Failed"), 1200, "the job to finish")

    say("\n4. Finished.\n$ kubectl get ftj quickstart -o wide")
    subprocess.run([*kubectl, "get", "ftj", "quickstart", "-o", "wide"], check=True)
    say(f"  phase {st['phase']}: {st.get('message')}")
    if st["phase"] != "Succeeded":
        return
    metrics = json.loads(s3.get_object(Bucket="runs", Key="quickstart/adapter/metrics.json")["Body"].read())
    em = metrics.get("exact_match") or {}
    before, after = (em.get("before") or {}).get("exact_match"), (em.get("after") or {}).get("exact_match")
    unquantized = (em.get("after_unquantized_base") or {}).get("exact_match")
    say(
        f"  held-out exact match of generated SQL ({(em.get('after') or {}).get('examples')} questions, "
        f"unseen schemas and phrasings): base model {before:.2f} -> fine-tuned {after:.2f} "
        + ("on the 4-bit base" if method == "qlora" else "on the full-precision base it was trained on")
        + ("" if unquantized is None else f", {unquantized:.2f} on the unquantized base")
    )
    for sample in (em.get("after") or {}).get("samples", [])[:3]:
        say(f"    reference:  {sample['reference']}\n    fine-tuned: {sample['prediction']}")
    adapter = st.get("adapter") or {}
    say(
        f"  adapter: {adapter.get('uri')} (sha256 {str(adapter.get('sha256'))[:16]}…, {adapter.get('sizeBytes')} bytes)"
    )
    say(
        "\n$ kubectl get adapters   # the adapter library: the job's adapter, registered (README: Adapter library)"
    )
    subprocess.run([*kubectl, "get", "adapters", "-o", "wide"], check=False)
    kept = keep_outputs(s3, "runs", "quickstart/adapter/", Path.cwd() / "runs" / "demo" / "quickstart")
    say(
        f"  copied out of the cluster to {kept}: the adapter, adapter_config.json, tokenizer, "
        "metrics.json, loss_curve.png, README.md (model card)"
    )
    say(load_snippet(kept, model_dir, method))
    events = core.list_namespaced_event("default", field_selector="involvedObject.name=quickstart").items
    say("\n$ kubectl get events --field-selector involvedObject.name=quickstart")
    for e in sorted(events, key=lambda e: e.metadata.creation_timestamp):
        say(f"  {e.type:8} {e.reason:20} {e.message[:120]}")


def keep_outputs(s3, bucket: str, prefix: str, dest: Path) -> Path:
    """Copy what the job wrote under s3://bucket/prefix into dest, which outlives the
    throwaway cluster (and its MinIO). Keys that would land outside dest are refused."""
    dest = dest.resolve()
    dest.mkdir(parents=True, exist_ok=True)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            target = (dest / obj["Key"][len(prefix) :]).resolve()
            if not target.is_relative_to(dest):
                raise ValueError(f"refusing {obj['Key']!r}: outside {dest}")
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(target))
    return dest


def load_snippet(adapter: Path, base: Path, method: str = "lora") -> str:
    """Three lines that load the kept adapter on the local base as it was trained (qlora:
    quantized to 4 bits; the unquantized base scores lower, the model card says how much)
    and generate SQL."""
    from kubetune_trainer.templates import render

    question = {
        "question": "How many heads are older than 56?",
        "context": "CREATE TABLE head (age INTEGER)",
        "answer": "SELECT COUNT(*) FROM head WHERE age > 56",  # what it should print
    }
    prompt = json.dumps(render(question, "text-to-sql", {}, None)[0])  # a Python string literal too
    if method == "qlora":
        where = "on the 4-bit base it was trained on"
        imports = "AutoTokenizer, BitsAndBytesConfig as Q"
        base_model = (
            f'M.from_pretrained("{base}", quantization_config=Q(load_in_4bit=True, bnb_4bit_quant_type="nf4", '
            "bnb_4bit_use_double_quant=True))"
        )
    else:
        where = "on the base it was trained on"
        imports = "AutoTokenizer"
        base_model = f'M.from_pretrained("{base}")'
    return (
        f"  load it {where} and generate, in the project's virtualenv (hack/ensure-env.sh --path):\n"
        f"    from peft import PeftModel; from transformers import AutoModelForCausalLM as M, {imports}\n"
        f'    tok, model = AutoTokenizer.from_pretrained("{adapter}"), PeftModel.from_pretrained({base_model}, '
        f'"{adapter}")\n'
        f'    print(tok.decode(model.generate(**tok({prompt}, return_tensors="pt"), max_new_tokens=40)[0]))'
    )


class Watch:
    """Prints a line whenever the job's phase or progress changes, until a condition holds."""

    def __init__(self, status) -> None:
        self.status, self.last = status, None

    def until(self, done, timeout_s: float, what: str) -> dict:
        def poll():
            st = self.status()
            p = st.get("progress") or {}
            line = (
                f"  {st.get('phase', '-'):10} attempt {st.get('attempt', '-')}  "
                f"step {p.get('summary', '-'):14} loss {p.get('loss', '-')!s:8} eta {p.get('eta', '-'):6}  "
                f"preemptions {st.get('preemptions', 0)}"
            )
            if line != self.last:
                say(line)
                self.last = line
            return st if done(st) else None

        return wait_for(poll, timeout_s, what, interval_s=1.0)
