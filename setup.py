"""cloudlets: render portable server images from a manifest and a root
filesystem tarball."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
# The version, read from its own module without importing the package.
VERSION = re.findall(r'^__version__ = "([^"]+)"$',
                     (HERE / "cloudlets" / "version.py").read_text(encoding="utf-8"), re.M)[0]

TEST = [
    "pytest>=8",
    "hypothesis>=6.100",
    "moto[server]==5.2.5",
    # libcloud's LOCAL storage driver (the generic adapter's test target)
    # imports fasteners, which libcloud does not declare.
    "fasteners>=0.19",
    "boto3>=1.34",
    "werkzeug>=3",
    # The service's tests: its API fuzzed from its own OpenAPI document.
    "schemathesis>=4",
    # schemathesis' and Starlette's HTTP client.
    "httpx>=0.27",
    "setuptools>=68",
    "wheel>=0.42",
    # an independent DSSE implementation the provenance tests verify our
    # envelopes with (not our own code checking itself)
    "securesystemslib>=1.0",
]
# `cloudlets serve`, the REST rendering service (cloudlets/service/).
SERVICE = [
    # The ASGI framework: routing, requests and responses, lifespan, and
    # nothing else. Not FastAPI: the request body embeds a cloudlet manifest,
    # which the library validates with its own JSON schema and JSON-pointer
    # problems; pydantic models would validate it a second time and answer 422
    # in another shape. The OpenAPI document is written out (docs/openapi.json).
    "starlette>=0.37",
    # The ASGI server: graceful stop on SIGTERM, then the app's lifespan
    # shutdown, where renders in flight are finished or failed.
    "uvicorn>=0.29",
    # uvicorn's HTTP parser in C (what uvicorn picks when it is installed;
    # else h11, in Python): a quarter less of the API process's CPU for each
    # request under the create benchmark (docs/service.rst), the event loop
    # being the service's one core for answers.
    "httptools>=0.6",
    # GET /metrics in the Prometheus text format.
    "prometheus-client>=0.20",
]
# `cloudlets worker` and `[queue] backend = "celery"`: renders on workers on
# other hosts (cloudlets/service/queue.py). An existing distributed task
# queue rather than one of our own: Celery gives late acknowledgement and
# redelivery of a task whose worker died, task states with progress, and
# its worker's pool and signal handling; Redis is its broker and result
# backend (the [redis] extra brings redis-py). Optional: the embedded pool of
# `cloudlets serve` needs neither.
CELERY = ["celery[redis]>=5.3"]
DOCS = ["sphinx>=7.2"]
# Exact linter versions: a newer ruff or mypy adds rules and turns CI red
# on code that did not change.
LINT = ["ruff==0.17.6", "mypy==2.4.1", "types-requests", "types-jsonschema"]
# benchmarks/ (run by hand): the floor pipeline of bench_disk.py inflates the
# tarball with rapidgzip's CLI, the fastest gzip inflater on two cores, so the
# floor is the machine's limit and not gzip's single thread.
BENCH = ["rapidgzip>=0.14"]

setup(
    name="cloudlets",
    version=VERSION,
    description="Render portable server images (raw, qcow2, OVF/OVA, Xen, VHD, EC2) "
                "from a manifest and a root filesystem tarball, rootless",
    long_description=(HERE / "README.rst").read_text(encoding="utf-8"),
    long_description_content_type="text/x-rst",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["cloudlets", "cloudlets.*"]),
    package_data={"cloudlets": ["py.typed", "schemas/*.json"]},
    install_requires=[
        "apache-libcloud>=3.8",
        "requests>=2.31",
        "jinja2>=3.1",
        "jsonschema>=4.21",
        # Regular expressions from manifests (volatile paths, argument
        # patterns): RE2 matches in linear time, where re's backtracking
        # takes 30 s for (a+)+$ on a 41-character value.
        "google-re2>=1.1",
        "cryptography>=42",
        # zstd-compressed rootfs tarballs: the standard library has no zstd
        # before Python 3.14, and the bindings stream in constant memory.
        "zstandard>=0.22",
        # gzip'd tarballs: ISA-L inflates 1.5x faster than zlib (0.96 s vs
        # 1.43 s for a 302 MB rootfs), the largest single cost of a render.
        "isal>=1.6",
    ],
    extras_require={
        "service": SERVICE,
        "celery": CELERY,
        "test": TEST + SERVICE + CELERY,
        "docs": DOCS + SERVICE + CELERY,  # the API reference imports cloudlets.service.*
        "lint": LINT + CELERY,
        "dev": TEST + SERVICE + CELERY + DOCS + LINT + BENCH,
    },
    entry_points={
        "console_scripts": ["cloudlets = cloudlets.cli:entry_point"],
    },
    classifiers=[
        "Development Status :: 3 - Alpha",
        "License :: OSI Approved :: Apache Software License",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.11",
        "Topic :: System :: Installation/Setup",
        "Typing :: Typed",
    ],
)
