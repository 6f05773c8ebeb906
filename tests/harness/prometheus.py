"""A private Prometheus server for tests: Debian's ``prometheus`` on a free loopback port, with a
data directory of its own and the config (and rule files) the test gives, and its HTTP API.

``start_prometheus(config, files={"rules.yaml": ...})`` writes ``prometheus.yml`` and the files
into the server's directory (so the config names rule files by their bare names) and returns once
``/-/ready`` answers. It is always a server of our own: tests read everything it scraped.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.harness.process import HOST, Server, start_owned

__all__ = ["PrometheusServer", "start_prometheus"]

_TIMEOUT_S = 10.0


class PrometheusServer(Server):
    """A Prometheus for tests (see :class:`tests.harness.process.Server`); ``api`` answers its
    HTTP API's ``data``."""

    def api(self, path: str, **params: str | float) -> Any:
        """GET /api/v1/<path>?params; the answer's ``data``, or RuntimeError with Prometheus' error."""
        query = urllib.parse.urlencode({k: str(v) for k, v in params.items()})
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            answer = json.loads(exc.read() or b"{}")
            raise RuntimeError(f"{path} {params}: {exc.code} {answer.get('error', '')}") from exc
        if answer.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {answer}")
        return answer["data"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """The series of a range query (what a Grafana time series panel asks)."""
        data = self.api("query_range", query=expr, start=start, end=end, step=step)
        assert data["resultType"] == "matrix", data
        series: list[dict[str, Any]] = data["result"]
        return series

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The samples of an instant query at the server's now."""
        result: list[dict[str, Any]] = self.api("query", query=expr)["result"]
        return result

    def label_values(self, label: str, match: str) -> list[str]:
        """What Grafana's ``label_values(match, label)`` lists."""
        values: list[str] = self.api(f"label/{label}/values", **{"match[]": match})
        return values

    def alerts(self) -> list[dict[str, Any]]:
        """The alerts pending or firing now."""
        alerts: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return alerts

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule with its health and last evaluation error."""
        groups = self.api("rules")["groups"]
        return [rule for group in groups for rule in group["rules"]]


def _binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        raise RuntimeError("no prometheus binary: run tests/install-servers.sh (Debian package prometheus)")
    return found


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/-/ready", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def start_prometheus(
    config: str, *, files: dict[str, str] | None = None, tmp_root: str | None = None
) -> PrometheusServer:
    """A private Prometheus reading ``config`` (prometheus.yml's text), with ``files`` (name ->
    text, e.g. rule files) next to it, its data in its own directory."""
    binary = _binary()

    def command(port: int, root: Path) -> list[str]:
        (root / "prometheus.yml").write_text(config)
        for name, text in (files or {}).items():
            (root / name).write_text(text)
        return [
            binary,
            f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address={HOST}:{port}",
            "--log.level=warn",
        ]

    process = start_owned("prometheus", command, _ready, tmp_root=tmp_root)
    return PrometheusServer(f"http://{HOST}:{process.port}", owned=True, process=process)
