"""`kubetune adapters`: the adapter library from the command line, kubectl-style.

    list [--base X] [--task Y]     the Adapters of a namespace (-o wide|yaml|json)
    show NAME                      one Adapter's record and status
    compare A B                    two records side by side
    verify [NAME ...]              check each adapter's sha256 in S3; set its Verified condition
    import s3://bucket/prefix/     recreate Adapters from the adapter.json files under a prefix
    export --base X --format F     what serves that base's adapters: vllm, kserve or kaito

S3 access: the Secret the Adapter records (its source job's spec.storage.secretRef, read
with your kube credentials), or --secret NAME, or the standard AWS environment."""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import json
import re
import sys
from pathlib import Path

import yaml

from kubetune import api
from kubetune.library import (
    KAITO_VERSION,
    KSERVE_VERSION,
    VLLM_VERSION,
    adapter_names,
    adapter_object,
    compare_rows,
    condition,
    format_table,
    kaito_export,
    kserve_export,
    matches,
    selector,
    table_rows,
    vllm_export,
)
from kubetune_trainer.library import ADAPTER_CONFIG_FILE, RECORD_FILE, WEIGHTS_FILE, AdapterSpec

EXIT_USAGE, EXIT_FAILED = 64, 1
# what a server needs of an adapter's folder (the tokenizer rides along when there is one)
SERVED_FILES = (WEIGHTS_FILE, ADAPTER_CONFIG_FILE, RECORD_FILE)


class Problem(Exception):
    """A user-facing failure: printed as is, exit 1."""


# -- cluster access ------------------------------------------------------------------------


class Library:
    def __init__(self, kubeconfig: str | None, namespace: str | None) -> None:
        from kubernetes import client, config

        if kubeconfig:
            api_client = config.new_client_from_config(kubeconfig)
            default_ns = config.list_kube_config_contexts(kubeconfig)[1]["context"].get("namespace")
        else:
            try:
                config.load_kube_config()
                default_ns = config.list_kube_config_contexts()[1]["context"].get("namespace")
            except config.ConfigException:
                config.load_incluster_config()
                default_ns = (
                    Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read_text().strip()
                )
            api_client = client.ApiClient()
        self.namespace = namespace or default_ns or "default"
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    def _args(self) -> tuple:
        return api.GROUP, api.VERSION, self.namespace, api.ADAPTER_PLURAL

    def list(self, label_selector: str = "") -> list[dict]:
        items = self.custom.list_namespaced_custom_object(*self._args(), label_selector=label_selector)[
            "items"
        ]
        return sorted(items, key=lambda a: a["metadata"]["name"])

    def get(self, name: str) -> dict:
        from kubernetes.client.rest import ApiException

        try:
            return self.custom.get_namespaced_custom_object(*self._args(), name)
        except ApiException as e:
            if e.status == 404:
                raise Problem(f"no Adapter {name} in namespace {self.namespace}") from e
            raise

    def create(self, obj: dict) -> bool:
        """False: one of that name exists already."""
        from kubernetes.client.rest import ApiException

        try:
            self.custom.create_namespaced_custom_object(*self._args(), obj)
            return True
        except ApiException as e:
            if e.status == 409:
                return False
            raise

    def set_verified(self, adapter: dict, ok: bool, reason: str, message: str) -> None:
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        old = condition(adapter, api.VERIFIED) or {}
        status = "True" if ok else "False"
        cond = {
            "type": api.VERIFIED,
            "status": status,
            "reason": reason,
            "message": message[:1024],
            "lastTransitionTime": old.get("lastTransitionTime", now) if old.get("status") == status else now,
        }
        others = [
            c for c in (adapter.get("status") or {}).get("conditions") or [] if c.get("type") != api.VERIFIED
        ]
        body = {"status": {"conditions": [*others, cond], "verifiedTime": now}}
        self.custom.patch_namespaced_custom_object_status(*self._args(), adapter["metadata"]["name"], body)

    def secret_keys(self, name: str) -> dict[str, str]:
        data = self.core.read_namespaced_secret(name, self.namespace).data or {}
        return {k: base64.b64decode(v).decode() for k, v in data.items()}


def s3_client(library: Library | None, storage: dict, secret: str | None, endpoint: str | None):
    """A boto3 client for an adapter's bucket: its recorded Secret (or --secret), its
    recorded endpoint (or --endpoint), else the standard AWS environment."""
    import boto3
    from botocore.config import Config

    secret = secret or storage.get("secretName")
    endpoint = endpoint or storage.get("endpoint")
    kw = {}
    if secret and library is not None:
        keys = library.secret_keys(secret)
        kw = {
            "aws_access_key_id": keys.get("AWS_ACCESS_KEY_ID"),
            "aws_secret_access_key": keys.get("AWS_SECRET_ACCESS_KEY"),
            "aws_session_token": keys.get("AWS_SESSION_TOKEN"),
        }
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=storage.get("region"),
        config=Config(
            retries={"mode": "standard", "max_attempts": 5},
            s3={"addressing_style": "path"} if endpoint else None,
        ),
        **kw,
    )


def split_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise Problem(f"{uri}: only s3:// URIs are in the library")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    return bucket, prefix.strip("/")


def object_sha256(s3, uri: str, name: str) -> str:
    bucket, prefix = split_uri(uri)
    body = s3.get_object(Bucket=bucket, Key=f"{prefix}/{name}" if prefix else name)["Body"]
    h = hashlib.sha256()
    for chunk in iter(lambda: body.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def verify_one(library: Library, adapter: dict, s3) -> tuple[bool, str]:
    """Check the adapter's weights in S3 against its recorded sha256; record the result
    as its Verified condition. (ok, message)."""
    spec = adapter["spec"]
    files = spec["adapter"]
    name = adapter["metadata"]["name"]
    try:
        actual = object_sha256(s3, files["uri"], WEIGHTS_FILE)
    except Exception as e:
        ok, reason, message = False, "Unreadable", f"{files['uri']}{WEIGHTS_FILE} cannot be read: {e}"
    else:
        ok = actual == files["sha256"]
        reason = "Sha256Matches" if ok else "Sha256Mismatch"
        message = (
            f"{WEIGHTS_FILE} has the recorded sha256 {actual[:12]}"
            if ok
            else f"{WEIGHTS_FILE} changed in S3: sha256 {actual[:12]}, recorded {files['sha256'][:12]}; "
            "do not serve it"
        )
    library.set_verified(adapter, ok, reason, message)
    return ok, f"{name}: {message}"


# -- commands ------------------------------------------------------------------------------


def _print_objects(objects: list[dict], output: str, wide: bool = False) -> None:
    if output == "json":
        doc = objects[0] if len(objects) == 1 else {"apiVersion": "v1", "kind": "List", "items": objects}
        print(json.dumps(doc, indent=2))
    elif output == "yaml":
        doc = objects[0] if len(objects) == 1 else {"apiVersion": "v1", "kind": "List", "items": objects}
        print(yaml.safe_dump(doc, sort_keys=False), end="")
    else:
        sys.stdout.write(format_table(table_rows(objects, wide=wide)))


def cmd_list(lib: Library, args) -> int:
    found = [a for a in lib.list(selector(args.base, args.task)) if matches(a, args.base, args.task)]
    if not found and args.output not in ("json", "yaml"):
        print(f"No adapters found in {lib.namespace} namespace.", file=sys.stderr)
        return 0
    if args.output in ("json", "yaml"):
        doc = {"apiVersion": "v1", "kind": "List", "items": found}
        print(
            json.dumps(doc, indent=2) if args.output == "json" else yaml.safe_dump(doc, sort_keys=False),
            end="",
        )
        return 0
    _print_objects(found, "table", wide=args.output == "wide")
    return 0


def cmd_show(lib: Library, args) -> int:
    adapter = lib.get(args.name)
    if args.output in ("json", "yaml"):
        _print_objects([adapter], args.output)
        return 0
    spec = adapter["spec"]
    verified = condition(adapter, api.VERIFIED)
    print(yaml.safe_dump({"name": args.name, **spec}, sort_keys=False), end="")
    if verified:
        print(f"verified: {verified['status']} ({verified.get('message', '')})")
    else:
        print("verified: never checked (kubetune adapters verify)")
    return 0


def cmd_compare(lib: Library, args) -> int:
    a, b = lib.get(args.a), lib.get(args.b)
    if args.output in ("json", "yaml"):
        _print_objects([a, b], args.output)
        return 0
    sys.stdout.write(format_table(compare_rows(a, b)))
    return 0


def cmd_verify(lib: Library, args) -> int:
    adapters = [lib.get(n) for n in args.names] if args.names else lib.list()
    failed = 0
    for adapter in adapters:
        s3 = s3_client(lib, adapter["spec"].get("storage") or {}, args.secret, args.endpoint)
        ok, message = verify_one(lib, adapter, s3)
        failed += not ok
        print(("ok      " if ok else "CHANGED ") + message)
    return EXIT_FAILED if failed else 0


def cmd_import(lib: Library, args) -> int:
    """Every adapter.json under the prefix becomes an Adapter (its Verified condition says
    whether the weights have the sha256 the record names). The record is the bucket's
    word: its S3 access is never taken from it (only from --secret/--endpoint/--region),
    and its source job names the Adapter only as a DNS-safe name, like the operator's."""
    bucket, prefix = split_uri(args.uri)
    storage = {"endpoint": args.endpoint, "secretName": args.secret, "region": args.region}
    storage = {k: v for k, v in storage.items() if v}
    s3 = s3_client(lib, storage, None, None)
    records = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        records += [o["Key"] for o in page.get("Contents", []) if o["Key"].rsplit("/", 1)[-1] == RECORD_FILE]
    created = skipped = 0
    for key in sorted(records):
        uri = f"s3://{bucket}/{key[: -len(RECORD_FILE)]}"
        try:
            spec = imported_spec(s3.get_object(Bucket=bucket, Key=key)["Body"].read(1 << 20), uri, storage)
        except Exception as e:  # one bad record does not stop the import
            print(f"skipped {uri}: {RECORD_FILE} is not an adapter record: {e}", file=sys.stderr)
            skipped += 1
            continue
        source = spec.get("source") or {}
        base = dns_name(args.prefix_name + (source.get("name") or uri.rstrip("/").rsplit("/", 1)[-1]))
        name = import_one(
            lib, s3, spec, candidate_names(base, source.get("uid"), spec["adapter"]["sha256"]), uri
        )
        if name:
            created += 1
        else:
            skipped += 1
    print(f"{created} imported, {skipped} skipped, from {len(records)} {RECORD_FILE} under {args.uri}")
    return 0 if records else EXIT_FAILED


def imported_spec(raw: bytes, uri: str, storage: dict) -> dict:
    """An Adapter spec from an adapter.json found at uri. Its S3 access is never the
    bucket's word (a planted record could send a later verify, with the Secret it names,
    to an endpoint of its choosing): only the importer's flags give it. The adapter is
    where the record was found (copied there, or made there)."""
    record = json.loads(raw)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    record.pop("storage", None)
    spec = AdapterSpec.model_validate(record).model_dump(mode="json", by_alias=True, exclude_none=True)
    spec["adapter"]["uri"] = uri
    if storage:
        spec["storage"] = dict(storage)
    return spec


def dns_name(text: str) -> str:
    """A Kubernetes object name (DNS subdomain) made from text."""
    name = re.sub(r"[^a-z0-9.-]+", "-", text.lower()).strip("-.")[:240].strip("-.")
    return name or "adapter"


def candidate_names(base: str, uid, sha256: str) -> list[str]:
    """The job's name, then with its UID's first 8 hex (as the operator names a second
    adapter of a job name), then with the adapter's own sha256's."""
    names = [base]
    if isinstance(uid, str) and re.fullmatch(r"[0-9a-f-]{8,64}", uid):
        names += adapter_names(base, uid)[1:]
    return [*names, f"{base}-{sha256[:8]}"]


def import_one(lib: Library, s3, spec: dict, names: list[str], uri: str) -> str | None:
    """Create the Adapter under the first free name; None when this very adapter is
    registered already (or cannot be), with a line saying so."""
    from kubernetes.client.rest import ApiException

    for name in names:
        existing = None
        try:
            if lib.create(adapter_object(name, lib.namespace, spec)):
                try:
                    ok, message = verify_one(lib, lib.get(name), s3)
                except ApiException as e:  # may create, may not write status: still imported
                    ok, message = True, ""
                    print(f"adapter/{name}: not verified ({e.status} {e.reason})", file=sys.stderr)
                print(f"adapter/{name} imported from {uri}" + ("" if ok else f" ({message})"))
                return name
            existing = lib.get(name)
        except ApiException as e:
            print(
                f"skipped {uri}: the API server refused adapter/{name}: {e.status} {e.reason}",
                file=sys.stderr,
            )
            return None
        if (existing.get("spec") or {}).get("adapter") == spec["adapter"]:
            print(f"adapter/{name} exists: not imported again")
            return None
    print(f"skipped {uri}: the names {', '.join(names)} hold other adapters", file=sys.stderr)
    return None


def download_adapter(s3, adapter: dict, dest: Path) -> Path:
    """The adapter's served files into dest/<name>/, its weights checked against the
    recorded sha256 (what the server will load is what was verified)."""
    name = adapter["metadata"]["name"]
    bucket, prefix = split_uri(adapter["spec"]["adapter"]["uri"])
    folder = dest / name
    folder.mkdir(parents=True, exist_ok=True)
    for file in SERVED_FILES:
        s3.download_file(bucket, f"{prefix}/{file}" if prefix else file, str(folder / file))
    h = hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()
    if h != adapter["spec"]["adapter"]["sha256"]:
        raise Problem(f"{name}: the downloaded {WEIGHTS_FILE} has sha256 {h[:12]}, not the recorded one")
    return folder


def cmd_export(lib: Library, args) -> int:
    adapters = [a for a in lib.list(selector(args.base, args.task)) if matches(a, args.base, args.task)]
    if args.names:
        adapters = [a for a in adapters if a["metadata"]["name"] in args.names]
    if not adapters:
        raise Problem(f"no adapters of base {args.base} in namespace {lib.namespace}")
    bad = []
    clients = {}
    for adapter in adapters:
        if args.no_verify:
            continue
        s3 = clients[adapter["metadata"]["name"]] = s3_client(
            lib, adapter["spec"].get("storage") or {}, args.secret, args.endpoint
        )
        ok, message = verify_one(lib, adapter, s3)
        if not ok:
            bad.append(message)
    if bad:
        raise Problem(
            "not exported: an adapter failed verification (never served unverified):\n  " + "\n  ".join(bad)
        )
    if args.format == "vllm":
        dest = Path(args.dir).resolve()
        folders = {}
        for adapter in adapters:
            s3 = clients.get(adapter["metadata"]["name"]) or s3_client(
                lib, adapter["spec"].get("storage") or {}, args.secret, args.endpoint
            )
            folders[adapter["metadata"]["name"]] = str(download_adapter(s3, adapter, dest))
        print(json.dumps(vllm_export(adapters, folders), indent=2))
    elif args.format == "kserve":
        print(yaml.safe_dump(kserve_export(adapters, args.name), sort_keys=False), end="")
    else:
        if not args.image_repo:
            raise Problem("--format kaito needs --image-repo: KAITO loads adapters from images")
        print(
            yaml.safe_dump(kaito_export(adapters, args.image_repo, args.preset, args.name), sort_keys=False),
            end="",
        )
    return 0


def add_parser(sub) -> None:
    ap = sub.add_parser(
        "adapters",
        help="the adapter library: list, show, compare, verify, import and export Adapters",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("-n", "--namespace", default=None, help="default: the kubeconfig context's")
    ap.add_argument("--kubeconfig", default=None)
    cmds = ap.add_subparsers(dest="adapters_command", required=True)

    def output(p, choices=("wide", "yaml", "json")):
        p.add_argument("-o", "--output", choices=choices, default="table")

    p = cmds.add_parser("list", help="the namespace's adapters")
    p.add_argument("--base", help="only this base model (Hub id, URI, or its label value)")
    p.add_argument("--task", help="only this task (dataset template)")
    output(p)
    p.set_defaults(run=cmd_list)

    p = cmds.add_parser("show", help="one adapter's record")
    p.add_argument("name")
    output(p, ("yaml", "json"))
    p.set_defaults(run=cmd_show)

    p = cmds.add_parser("compare", help="two adapters side by side")
    p.add_argument("a")
    p.add_argument("b")
    output(p, ("yaml", "json"))
    p.set_defaults(run=cmd_compare)

    for name, helptext in (
        ("verify", "check adapters' sha256 in S3 (all of the namespace's by default)"),
        ("import", "recreate Adapters from the adapter.json files under an S3 prefix"),
        ("export", "print what serves one base's adapters (vLLM, KServe, KAITO)"),
    ):
        p = cmds.add_parser(name, help=helptext)
        p.add_argument(
            "--secret", default=None, help="a Secret of the namespace with AWS_ACCESS_KEY_ID/..._KEY"
        )
        p.add_argument("--endpoint", default=None, help="S3 endpoint (MinIO, R2, ...)")
        if name == "verify":
            p.add_argument("names", nargs="*")
            p.set_defaults(run=cmd_verify)
        elif name == "import":
            p.add_argument("uri", help="s3://bucket/prefix/")
            p.add_argument("--region", default=None)
            p.add_argument("--prefix-name", default="", help="prepended to each Adapter's name")
            p.set_defaults(run=cmd_import)
        else:
            p.add_argument("--base", required=True, help="the base model the server runs")
            p.add_argument("--task", default=None)
            p.add_argument("--format", choices=["vllm", "kserve", "kaito"], required=True)
            p.add_argument("--names", nargs="*", default=None, help="only these adapters")
            p.add_argument("--dir", default="adapters", help="vllm: where the adapters are downloaded")
            p.add_argument("--name", default=None, help="kserve/kaito: the object's name")
            p.add_argument("--image-repo", default=None, help="kaito: where the adapter images are pushed")
            p.add_argument("--preset", default=None, help="kaito: the base's preset name")
            p.add_argument("--no-verify", action="store_true", help="skip the sha256 check (not advised)")
            p.set_defaults(run=cmd_export)
    ap.set_defaults(func=run)
    ap.epilog = f"Targets: {VLLM_VERSION}; {KSERVE_VERSION}; {KAITO_VERSION}."


def run(args) -> int:
    lib = Library(args.kubeconfig, args.namespace)
    try:
        return args.run(lib, args)
    except Problem as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
