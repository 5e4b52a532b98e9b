"""Remote image URLs in chat requests to openai_api/: fetched only from the operator's list of
hosts, against a local image host (http.server on 127.0.0.1, listed by its address, with http
allowed) and the session's real tritonserver. A fetched image answers exactly as the same image sent
as a data URL; unlisted hosts, listed names that resolve to private addresses, redirects off the
list, bodies past the size limit and slow hosts are refused with OpenAI's 400 `invalid_image_url`.
Over https, the connection goes to the checked address and the certificate is checked for the name."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from openai_server import MODEL, serve

from client.llm import GrpcClient
from openai_api.images import ImageFetchError, ImagePolicy, fetch

openai = pytest.importorskip("openai")

MAX_BYTES = 200_000  # the server's --max-image-bytes: the PNG fits, /big does not
TIMEOUT_S = 2.0  # its --image-fetch-timeout
BIG_BYTES = 64 * 2**20  # what /big would send in all


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (48, 40), (30, 160, 90)).save(buf, format="PNG")
    return buf.getvalue()


class ImageHost:
    """The peer under test's control: what it serves, which paths were asked for, how much of /big
    went out before the client hung up."""

    def __init__(self, tls=None):
        """`tls`: an ssl.SSLContext to serve https with."""
        self.png = _png()
        self.hits: list[str] = []
        self.big_sent = 0
        self.big_done = threading.Event()
        host = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # a body without Content-Length ends when the connection does

            def log_message(self, *args):
                pass

            def do_GET(self):
                host.hits.append(self.path)
                if self.path == "/cat.png":
                    self._send(200, {"Content-Type": "image/png", "Content-Length": str(len(host.png))})
                    self.wfile.write(host.png)
                elif self.path == "/moved":  # a redirect that stays on the list
                    self._send(302, {"Location": "/cat.png"})
                elif self.path == "/away":  # a redirect to a host off the list (the same server)
                    self._send(302, {"Location": f"http://127.0.0.2:{host.port}/cat.png"})
                elif self.path == "/page":
                    self._send(200, {"Content-Type": "text/html"})
                    self.wfile.write(b"<html></html>")
                elif self.path == "/declared-big":
                    self._send(200, {"Content-Type": "image/png", "Content-Length": str(BIG_BYTES)})
                elif self.path == "/big":  # no Content-Length: only counting while reading stops it
                    self._send(200, {"Content-Type": "image/png"})
                    block = b"\0" * 65536
                    try:
                        while host.big_sent < BIG_BYTES:
                            self.wfile.write(block)
                            host.big_sent += len(block)
                    except OSError:
                        pass  # the client hung up
                    finally:
                        host.big_done.set()
                elif self.path == "/slow":  # headers at once, then a byte a second
                    self._send(200, {"Content-Type": "image/png"})
                    try:
                        for _ in range(30):
                            self.wfile.write(b"\0")
                            self.wfile.flush()
                            time.sleep(1)
                    except OSError:
                        pass
                else:
                    self._send(404, {})

            def _send(self, status, headers):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def image_host():
    host = ImageHost()
    yield host
    host.close()


@pytest.fixture(scope="module")
def oai(triton, image_host, tmp_path_factory):
    """The OpenAI server allowing the image host by its address (and `localhost`, a name that
    resolves to a loopback address: refused all the same). The list comes from the environment, as
    `make serve` and the images pass it on; the limits from flags."""
    env = {"OPENAI_ALLOWED_IMAGE_HOSTS": "127.0.0.1,localhost", "OPENAI_ALLOW_HTTP_IMAGES": "1"}
    args = ("--max-image-bytes", str(MAX_BYTES), "--image-fetch-timeout", str(TIMEOUT_S))
    log = tmp_path_factory.mktemp("openai_images") / "server.log"
    with serve(triton.grpc_url, log, args=args, env=env) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)


def _messages(url: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]


def _chat(oai, url: str):
    return oai.chat.completions.create(model=MODEL, messages=_messages(url), max_tokens=8, temperature=0)


def _refused(oai, url: str) -> str:
    with pytest.raises(openai.BadRequestError) as e:
        _chat(oai, url)
    body = e.value.body
    assert body["code"] == "invalid_image_url" and body["param"] == "messages", body
    assert body["type"] == "invalid_request_error" and body["message"].startswith("messages[0].content[1]: ")
    return body["message"]


def test_a_listed_host_answers_as_the_data_url(triton, oai, image_host):
    data_url = "data:image/png;base64," + base64.b64encode(image_host.png).decode()
    inline = _chat(oai, data_url)
    fetched = _chat(oai, image_host.url("/cat.png"))
    redirected = _chat(oai, image_host.url("/moved"))  # a redirect on the list is followed
    with GrpcClient(triton.grpc_url) as c:
        want = c.generate(messages=_messages(data_url), max_tokens=8, temperature=0.0)
    assert fetched.choices[0].message.content == inline.choices[0].message.content == want.text
    assert redirected.choices[0].message.content == want.text
    assert fetched.usage.prompt_tokens == inline.usage.prompt_tokens == want.num_input_tokens > 20


def test_an_unlisted_host_is_refused_before_any_request(oai, image_host):
    before = len(image_host.hits)
    message = _refused(oai, image_host.url("/cat.png", host="127.0.0.2"))
    assert "'127.0.0.2' is not on this server's list of image hosts" in message
    assert len(image_host.hits) == before


def test_a_listed_name_that_resolves_to_a_private_address_is_refused(oai, image_host):
    before = len(image_host.hits)
    message = _refused(oai, image_host.url("/cat.png", host="localhost"))
    assert "'localhost' resolves to a non-public address" in message
    assert len(image_host.hits) == before


def test_a_redirect_off_the_list_is_refused(oai, image_host):
    message = _refused(oai, image_host.url("/away"))
    target = image_host.url("/cat.png", host="127.0.0.2")
    unlisted = "the host '127.0.0.2' is not on this server's list of image hosts"
    assert message.endswith(f"redirected to {target}: {unlisted}")
    assert image_host.hits[-1] == "/away"  # the redirect's target was never asked for


def test_a_body_past_the_limit_is_refused_while_it_streams(oai, image_host):
    message = _refused(oai, image_host.url("/big"))
    assert f"larger than {MAX_BYTES} bytes" in message
    assert image_host.big_done.wait(10)
    # the fetch stopped reading at the limit: what went out is the limit plus socket buffers
    assert image_host.big_sent < BIG_BYTES / 4, image_host.big_sent
    message = _refused(oai, image_host.url("/declared-big"))
    assert f"the image is {BIG_BYTES} bytes; at most {MAX_BYTES} are accepted" in message


def test_a_slow_host_times_out(oai, image_host):
    t0 = time.monotonic()
    message = _refused(oai, image_host.url("/slow"))
    assert f"took longer than {TIMEOUT_S:g} s" in message
    assert time.monotonic() - t0 < TIMEOUT_S + 2


def test_not_an_image_and_not_found_are_refused(oai, image_host):
    assert "not an image (Content-Type 'text/html')" in _refused(oai, image_host.url("/page"))
    assert "answered HTTP 404" in _refused(oai, image_host.url("/missing.png"))


def test_http_needs_allowing(image_host):
    """Without --allow-http-images only https is fetched (refused before any connection)."""
    policy = ImagePolicy(frozenset({"127.0.0.1"}))
    with pytest.raises(ImageFetchError, match="image URLs must use https, got 'http'"):
        asyncio.run(fetch(image_host.url("/cat.png"), policy))
    allowed = ImagePolicy(frozenset({"127.0.0.1"}), allow_http=True)
    assert asyncio.run(fetch(image_host.url("/cat.png"), allowed)) == image_host.png


def test_the_host_list_takes_bare_hosts_only():
    hosts = ImagePolicy.parse_hosts(" Images.Example.COM., 10.0.0.5,[::1],, ")
    assert hosts == {"images.example.com", "10.0.0.5", "::1"}
    for bad in ("https://images.example.com", "images.example.com:443", "*.example.com", "a.example/x"):
        with pytest.raises(ValueError, match="not a host name or an IP address"):
            ImagePolicy.parse_hosts(bad)


def test_https_connects_to_the_checked_address_and_verifies_the_name(tmp_path, monkeypatch):
    """A listed name over https: the connection goes to the address the check returned, while Host
    and the certificate check use the name (a self-signed certificate for `img.test`, trusted here;
    the check's DNS answer is stood in for, as no public name resolves to this machine)."""
    import shutil
    import ssl
    import subprocess

    import openai_api.images as images

    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
         "-days", "1", "-subj", "/CN=img.test", "-addext", "subjectAltName=DNS:img.test"],
        check=True, capture_output=True,
    )  # fmt: skip
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    host = ImageHost(tls)
    trusted = ssl.create_default_context(cafile=str(cert))
    monkeypatch.setattr(images, "_tls", lambda: trusted)
    resolved = []

    async def public_answer(name, port):
        resolved.append(name)
        return "127.0.0.1"

    monkeypatch.setattr(images, "_address", public_answer)
    try:
        policy = ImagePolicy(frozenset({"img.test"}))
        assert asyncio.run(fetch(f"https://img.test:{host.port}/cat.png", policy)) == host.png
        assert resolved == ["img.test"] and host.hits == ["/cat.png"]
        monkeypatch.setattr(images, "_tls", ssl.create_default_context)  # the usual roots: refused
        with pytest.raises(ImageFetchError, match="CERTIFICATE_VERIFY_FAILED"):
            asyncio.run(fetch(f"https://img.test:{host.port}/cat.png", policy))
    finally:
        host.close()
