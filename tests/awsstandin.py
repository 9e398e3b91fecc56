"""A local AWS stand-in for the EC2 format's tests: moto's server
application, served on 127.0.0.1 by werkzeug in a thread, behind a small
WSGI layer that fills the gaps the EC2 format runs into.

Pinned to ``moto[server]==5.2.5`` (the layer uses moto's
``DomainDispatcherApplication``/``create_backend_app``, its S3 and EC2
backends and ``Ami``); other versions may differ in those internals.

What the layer adds or changes:

* **ImportSnapshot**, **DescribeImportSnapshotTasks** and **CancelImportTask**
  (moto has none): the task reads the object from moto's S3 backend and,
  after :attr:`AWSStandIn.import_polls` polls, creates an EBS snapshot of the
  right size in moto's EC2 backend. A missing object, or content that does
  not match the declared format (VMDK magic, VHD footer), makes the task
  ``deleted`` with a ``ClientError`` status message, as EC2 reports it.
* **RegisterImage** (moto keeps only the name and description): checks that
  the root snapshot, or the bundle manifest and its parts, exist in the
  backends, refuses duplicate names and bad values, and keeps the root
  device, block device mappings, architecture, virtualization type, boot
  mode, ENA support and image location, which DescribeImages then reports.
* **Response quirks**: moto answers EC2 calls with the namespace
  ``http://ec2.amazonaws.com/doc/2016-11-15`` (no trailing slash) where EC2
  and libcloud's parser use ``.../2016-11-15/``, so libcloud finds nothing
  (``list_images()`` returns ``[]``); and it puts that namespace on error
  documents, which EC2 does not, so libcloud cannot read the error code.
  Both are rewritten.
* **Fault injection**: :meth:`AWSStandIn.fail_next` makes the next call of
  an action answer with an AWS error.
"""

from __future__ import annotations

import math
import secrets
import threading
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape

import pytest
from werkzeug.serving import WSGIRequestHandler, make_server

MOTO_PIN = "moto[server]==5.2.5"
EC2_NAMESPACE = "http://ec2.amazonaws.com/doc/2016-11-15/"
_MOTO_NAMESPACE = b'xmlns="http://ec2.amazonaws.com/doc/2016-11-15"'
GiB = 1024 ** 3
ARCHITECTURES = ("arm64", "i386", "x86_64", "x86_64_mac", "arm64_mac")
BOOT_MODES = ("legacy-bios", "uefi", "uefi-preferred")

StartResponse = Callable[..., Any]


class _AWSFault(Exception):
    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass
class ImportTask:
    """One ImportSnapshot task."""

    task_id: str
    bucket: str
    key: str
    disk_format: str
    description: str
    region: str
    status: str = "active"
    message: str = "pending"
    progress: int = 0
    polls: int = 0
    snapshot_id: str = ""
    disk_size: int = 0


@dataclass
class AWSStandIn:
    """The WSGI layer; :attr:`url` is set once served.

    :ivar import_polls: DescribeImportSnapshotTasks calls that report a task
        ``active`` before it completes; ``None`` keeps it active forever.
    :ivar calls: every EC2 action seen, in order.
    """

    import_polls: int | None = 1
    calls: list[str] = field(default_factory=list)
    tasks: dict[str, ImportTask] = field(default_factory=dict)
    url: str = ""
    _faults: dict[str, _AWSFault] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _moto: Any = None

    def __post_init__(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

        self._moto = DomainDispatcherApplication(create_backend_app)

    # -- test API -----------------------------------------------------------

    def fail_next(self, action: str, code: str, message: str, status: int = 400) -> None:
        """Answer the next ``action`` call with an AWS error."""
        self._faults[action] = _AWSFault(code, message, status)

    def ec2_backend(self, region: str = "us-east-1") -> Any:
        from moto.core.models import DEFAULT_ACCOUNT_ID
        from moto.ec2.models import ec2_backends

        return ec2_backends[DEFAULT_ACCOUNT_ID][region]

    def s3_object(self, bucket: str, key: str) -> Any:
        """:returns: moto's key object, or ``None``."""
        from moto.core.models import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        try:
            return s3_backends[DEFAULT_ACCOUNT_ID]["aws"].get_object(bucket, key)
        except Exception:  # noqa: BLE001 - moto raises its own missing-bucket errors
            return None

    # -- WSGI ---------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        params = self._ec2_params(environ)
        if params is None:
            return self._moto(environ, start_response)  # type: ignore[no-any-return]
        action = params.get("Action", "")
        self.calls.append(action)
        region = self._region(environ)
        try:
            fault = self._faults.pop(action, None)
            if fault is not None:
                raise fault
            handler = getattr(self, f"_{_snake(action)}", None)
            if handler is not None:
                with self._lock:
                    body = handler(params, region)
                return self._respond(start_response, "200 OK", body.encode())
        except _AWSFault as fault:
            return self._respond(start_response, f"{fault.status} Error",
                                 _error_document(fault.code, fault.message))
        return self._moto_fixed(environ, start_response)

    def _moto_fixed(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        captured: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            captured["status"], captured["headers"] = status, headers
            return lambda data: None

        chunks = self._moto(environ, capture)
        try:
            body = b"".join(chunks)
        finally:
            if hasattr(chunks, "close"):
                chunks.close()
        if body.lstrip().startswith(b"<?xml") and b"<Errors>" in body:
            body = body.replace(b" " + _MOTO_NAMESPACE, b"", 1)
        else:
            body = body.replace(_MOTO_NAMESPACE, f'xmlns="{EC2_NAMESPACE}"'.encode())
        return self._respond(start_response, captured["status"], body,
                             [(k, v) for k, v in captured["headers"]
                              if k.lower() not in ("content-length", "content-type")])

    @staticmethod
    def _respond(start_response: StartResponse, status: str, body: bytes,
                 headers: list[tuple[str, str]] | None = None) -> list[bytes]:
        start_response(status, [*(headers or []), ("Content-Type", "text/xml"),
                                ("Content-Length", str(len(body)))])
        return [body]

    @staticmethod
    def _ec2_params(environ: dict[str, Any]) -> dict[str, str] | None:
        """:returns: the Query API parameters of an EC2 request, else ``None``."""
        authorization = environ.get("HTTP_AUTHORIZATION", "")
        if "/ec2/aws4_request" not in authorization:
            return None
        params = dict(parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True))
        if environ.get("CONTENT_TYPE", "").startswith("application/x-www-form-urlencoded"):
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(length) if length else b""
            import io

            environ["wsgi.input"] = io.BytesIO(body)
            params.update(parse_qsl(body.decode(), keep_blank_values=True))
        return params

    @staticmethod
    def _region(environ: dict[str, Any]) -> str:
        authorization = environ.get("HTTP_AUTHORIZATION", "")
        try:
            scope = authorization.split("Credential=", 1)[1].split(",", 1)[0]
            return str(scope.split("/")[2])
        except IndexError:
            return "us-east-1"

    # -- actions ------------------------------------------------------------

    def _import_snapshot(self, params: dict[str, str], region: str) -> str:
        bucket = params.get("DiskContainer.UserBucket.S3Bucket", "")
        key = params.get("DiskContainer.UserBucket.S3Key", "")
        disk_format = params.get("DiskContainer.Format", "").upper()
        if not bucket or not key:
            raise _AWSFault("InvalidParameter", "DiskContainer.UserBucket is required")
        if disk_format not in ("RAW", "VMDK", "VHD", "VHDX"):
            raise _AWSFault("InvalidParameter",
                            f"Unsupported disk format {disk_format or '(none)'}")
        task = ImportTask(task_id=f"import-snap-{secrets.token_hex(8)}", bucket=bucket, key=key,
                          disk_format=disk_format, description=params.get("Description", ""),
                          region=region)
        self.tasks[task.task_id] = task
        return _document("ImportSnapshotResponse",
                         f"<description>{escape(task.description)}</description>"
                         f"<importTaskId>{task.task_id}</importTaskId>"
                         f"{_task_detail(task)}")

    def _describe_import_snapshot_tasks(self, params: dict[str, str], region: str) -> str:
        wanted = [v for k, v in sorted(params.items()) if k.startswith("ImportTaskId.")]
        items = []
        for task_id in wanted or list(self.tasks):
            task = self.tasks.get(task_id)
            if task is None:
                raise _AWSFault("InvalidConversionTaskId.Malformed",
                                f"The import task {task_id} does not exist")
            self._advance(task)
            items.append(f"<item><description>{escape(task.description)}</description>"
                         f"<importTaskId>{task.task_id}</importTaskId>{_task_detail(task)}"
                         "</item>")
        return _document("DescribeImportSnapshotTasksResponse",
                         f"<importSnapshotTaskSet>{''.join(items)}</importSnapshotTaskSet>")

    def _cancel_import_task(self, params: dict[str, str], region: str) -> str:
        task = self.tasks.get(params.get("ImportTaskId", ""))
        if task is None:
            raise _AWSFault("InvalidConversionTaskId", "no such import task")
        previous = task.status
        if previous == "active":
            task.status, task.message = "deleted", "ClientError: cancelled: " + \
                params.get("CancelReason", "")
        return _document("CancelImportTaskResponse",
                         f"<importTaskId>{task.task_id}</importTaskId>"
                         f"<previousState>{previous}</previousState>"
                         f"<state>{task.status}</state>")

    def _advance(self, task: ImportTask) -> None:
        if task.status != "active":
            return
        task.polls += 1
        content = self.s3_object(task.bucket, task.key)
        if content is None:
            task.status = "deleted"
            task.message = (f"ClientError: Disk validation failed [We were unable to read your "
                            f"import's S3 object s3://{task.bucket}/{task.key}]")
            return
        data = content.value
        task.disk_size = len(data)
        problem = _format_problem(task.disk_format, data)
        if problem:
            task.status, task.message = "deleted", f"ClientError: {problem}"
            return
        if self.import_polls is None or task.polls <= self.import_polls:
            task.message, task.progress = "converting", min(99, 30 * task.polls)
            return
        backend = self.ec2_backend(task.region)
        volume = backend.create_volume(size=max(1, math.ceil(task.disk_size / GiB)),
                                       zone_name=f"{task.region}a")
        snapshot = backend.create_snapshot(volume.id, f"Created by ImportSnapshot "
                                           f"{task.task_id}")
        backend.delete_volume(volume.id)
        task.snapshot_id = snapshot.id
        task.status, task.message, task.progress = "completed", "", 100

    def _register_image(self, params: dict[str, str], region: str) -> str:
        from moto.ec2.models.amis import Ami
        from moto.ec2.utils import random_ami_id

        backend = self.ec2_backend(region)
        name = params.get("Name", "")
        if not name:
            raise _AWSFault("MissingParameter", "The request must contain the parameter name")
        if any(ami.name == name for ami in backend.amis.values()):
            raise _AWSFault("InvalidAMIName.Duplicate",
                            f"AMI name {name} is already in use by AMI")
        architecture = params.get("Architecture", "i386")
        if architecture not in ARCHITECTURES:
            raise _AWSFault("InvalidParameterValue",
                            f"Value ({architecture}) for parameter architecture is invalid.")
        boot_mode = params.get("BootMode")
        if boot_mode is not None and boot_mode not in BOOT_MODES:
            raise _AWSFault("InvalidParameterValue",
                            f"Value ({boot_mode}) for parameter bootMode is invalid.")
        mappings = _block_device_mappings(params)
        location = params.get("ImageLocation")
        root_device = params.get("RootDeviceName")
        snapshot = None
        if location:
            self._check_bundle(location)
            root_type = "instance-store"
            root_device = root_device or "/dev/sda1"
        else:
            root = next((m for m in mappings if m.get("DeviceName") == root_device), None)
            if root_device is None or root is None or "SnapshotId" not in root.get("Ebs", {}):
                raise _AWSFault("InvalidBlockDeviceMapping",
                                "the root device name must map to an EBS snapshot")
            snapshot_id = root["Ebs"]["SnapshotId"]
            snapshot = backend.snapshots.get(snapshot_id)
            if snapshot is None:
                raise _AWSFault("InvalidSnapshot.NotFound",
                                f"The snapshot '{snapshot_id}' does not exist.")
            root["Ebs"].setdefault("VolumeSize", snapshot.volume.size)
            root_type = "ebs"
        ami = _RegisteredAmi(
            backend, random_ami_id(), name=name, description=params.get("Description"),
            architecture=architecture,
            virtualization_type=params.get("VirtualizationType", "paravirtual"),
            root_device_name=root_device, root_device_type=root_type,
            image_location=location, boot_mode=boot_mode or "")
        # Ami.__init__ makes a stand-in snapshot of its own; drop it.
        backend.snapshots.pop(ami.ebs_snapshot.id, None)
        ami.mappings = mappings
        ami.ena_support = params.get("EnaSupport", "").lower() == "true"
        if snapshot is not None:
            ami.ebs_snapshot = snapshot
        backend.amis[ami.id] = ami
        assert isinstance(ami, Ami)
        return _document("RegisterImageResponse", f"<imageId>{ami.id}</imageId>")

    def _check_bundle(self, location: str) -> None:
        bucket, _, key = location.partition("/")
        content = self.s3_object(bucket, key)
        if content is None:
            raise _AWSFault("InvalidManifest",
                            f"Failed to read the manifest s3://{bucket}/{key}")
        try:
            root = ET.fromstring(content.value)
        except ET.ParseError:
            raise _AWSFault("InvalidManifest", "the manifest is not XML") from None
        directory = key.rpartition("/")[0]
        for part in root.iterfind("image/parts/part"):
            part_key = f"{directory}/{part.findtext('filename')}".lstrip("/")
            if self.s3_object(bucket, part_key) is None:
                raise _AWSFault("InvalidManifest",
                                f"bundle part s3://{bucket}/{part_key} does not exist")


def _amis_module() -> Any:
    from moto.ec2.models import amis

    return amis


class _RegisteredAmi(_amis_module().Ami):  # type: ignore[misc]
    """An AMI that reports the block device mappings it was registered with."""

    mappings: list[dict[str, Any]]

    @property
    def block_device_mappings(self) -> list[dict[str, Any]]:
        return self.mappings


def _snake(action: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in action).lstrip("_")


def _document(root: str, inner: str) -> str:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<{root} xmlns="{EC2_NAMESPACE}">'
            f"<requestId>{secrets.token_hex(8)}</requestId>{inner}</{root}>")


def _error_document(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
            f"<Code>{escape(code)}</Code><Message>{escape(message)}</Message></Error></Errors>"
            f"<RequestID>{secrets.token_hex(8)}</RequestID></Response>").encode()


def _task_detail(task: ImportTask) -> str:
    snapshot = f"<snapshotId>{task.snapshot_id}</snapshotId>" if task.snapshot_id else ""
    return (f"<snapshotTaskDetail><description>{escape(task.description)}</description>"
            f"<diskImageSize>{task.disk_size}</diskImageSize><format>{task.disk_format}</format>"
            f"<progress>{task.progress}</progress>{snapshot}<status>{task.status}</status>"
            f"<statusMessage>{escape(task.message)}</statusMessage>"
            f"<userBucket><s3Bucket>{escape(task.bucket)}</s3Bucket>"
            f"<s3Key>{escape(task.key)}</s3Key></userBucket></snapshotTaskDetail>")


def _format_problem(disk_format: str, data: bytes) -> str:
    if not data:
        return "Disk validation failed [the image is empty]"
    if disk_format == "VMDK" and data[:4] != b"KDMV":
        return "Unknown Image Format (not a VMDK sparse extent)"
    if disk_format == "VHD" and data[-512:-504] != b"conectix":
        return "Unknown Image Format (no VHD footer)"
    if disk_format == "RAW" and (data[:4] == b"KDMV" or data[:4] == b"QFI\xfb"):
        return "Unknown Image Format (declared RAW, but it is not)"
    return ""


def _block_device_mappings(params: dict[str, str]) -> list[dict[str, Any]]:
    found: dict[int, dict[str, Any]] = {}
    for name, value in params.items():
        parts = name.split(".")
        if parts[0] != "BlockDeviceMapping" or len(parts) < 3 or not parts[1].isdigit():
            continue
        mapping = found.setdefault(int(parts[1]), {})
        if parts[2] == "Ebs" and len(parts) == 4:
            ebs = mapping.setdefault("Ebs", {})
            if parts[3] == "VolumeSize":
                ebs[parts[3]] = int(value)
            elif parts[3] in ("DeleteOnTermination", "Encrypted"):
                ebs[parts[3]] = value.lower() == "true"
            else:
                ebs[parts[3]] = value
        else:
            mapping[parts[2]] = value
    return [found[index] for index in sorted(found)]


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


def serve(standin: AWSStandIn) -> tuple[Any, threading.Thread, str]:
    """Serve ``standin`` on 127.0.0.1 in a daemon thread.

    :returns: the server, its thread and its URL.
    """
    server = make_server("127.0.0.1", 0, standin, threaded=True, request_handler=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="aws-standin", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    standin.url = url
    return server, thread, url


@pytest.fixture
def aws_standin(monkeypatch: pytest.MonkeyPatch) -> Iterator[AWSStandIn]:
    """A fresh stand-in on 127.0.0.1 (moto's state reset), with dummy
    credentials in the environment and no default AMIs loaded."""
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_EC2", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    standin = AWSStandIn()
    server, thread, url = serve(standin)
    request = urllib.request.Request(f"{url}/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    try:
        yield standin
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()
