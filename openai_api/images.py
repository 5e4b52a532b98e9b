"""Remote image URLs: fetched by this server from an operator's allow-list of hosts, or refused.

The rule (docs/api.md, "Remote images"): a URL is fetched only when its host is on the list
(exact names or IP addresses), over https unless http is allowed too, and every redirect hop is
checked the same way. A listed *name* must resolve to public addresses only: DNS for a name can be
changed or made to point inside the network (server-side request forgery, e.g. a cloud metadata
service at 169.254.169.254), so a private, loopback, link-local or otherwise non-global answer is
refused. An operator reaches an internal host by listing its *address*. The connection goes to
the address that was checked (the name is kept for Host and TLS), so a second DNS answer cannot
slip past the check. The body must be image/*, is cut off past `max_bytes` while it streams, and
the whole fetch (DNS, redirects, body) has one time limit.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
from dataclasses import dataclass

import httpx

from openai_api.errors import bad_request

MAX_IMAGES = 8  # the ensemble's limit (docs/api.md): checked here so that no more are fetched
MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class RemoteImage:
    """An image part whose URL is fetched before the request goes to Triton."""

    url: str
    where: str  # e.g. "messages[0].content[1]", for error messages


@dataclass(frozen=True)
class ImagePolicy:
    allowed_hosts: frozenset[str] = frozenset()  # normalized: lowercase, no brackets or trailing dot
    allow_http: bool = False
    max_bytes: int = 20 * 2**20
    timeout_s: float = 10.0

    @staticmethod
    def parse_hosts(spec: str) -> frozenset[str]:
        """'a.example,10.0.0.5,[::1]' -> the normalized set; anything but a bare host is refused."""
        hosts = set()
        for raw in spec.split(","):
            entry = raw.strip()
            if not entry:
                continue
            bare = entry[1:-1] if entry.startswith("[") and entry.endswith("]") else entry
            if _is_ip(bare):
                hosts.add(_normalize(bare))
                continue
            try:
                url = httpx.URL(f"https://{entry}/")
            except httpx.InvalidURL:
                url = None
            if url is None or any(c in entry for c in "/:*@?#[] ") or not url.host:
                raise ValueError(
                    f"{entry!r} is not a host name or an IP address (no scheme, port, path or *)"
                )
            hosts.add(_host(url))
        return frozenset(hosts)


def _normalize(host: str) -> str:
    host = host.lower().rstrip(".")
    return str(ipaddress.ip_address(host)) if _is_ip(host) else host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class ImageFetchError(Exception):
    pass


async def resolve_images(images: list, policy: ImagePolicy | None) -> list[bytes]:
    """The request's images in order, each RemoteImage fetched (concurrently); errors are 400s."""
    remote = [im for im in images if isinstance(im, RemoteImage)]
    if not remote:
        return images
    if policy is None or not policy.allowed_hosts:
        im = remote[0]
        raise bad_request(
            f"{im.where}: this server does not fetch remote image URLs; send the image as a data URL "
            "(data:image/...;base64,...)",
            "messages",
            "invalid_image_url",
        )
    if len(images) > MAX_IMAGES:
        raise bad_request(f"{len(images)} images; at most {MAX_IMAGES} per request", "messages")

    async def one(im):
        if not isinstance(im, RemoteImage):
            return im
        try:
            return await asyncio.wait_for(fetch(im.url, policy), policy.timeout_s)
        except asyncio.TimeoutError:
            reason = f"fetching the image took longer than {policy.timeout_s:g} s"
        except ImageFetchError as e:
            reason = str(e)
        raise bad_request(f"{im.where}: {reason}", "messages", "invalid_image_url")

    return list(await asyncio.gather(*(one(im) for im in images)))


@functools.cache
def _tls():
    return httpx.create_ssl_context()  # certifi's roots, as httpx's default; built once


async def fetch(url: str, policy: ImagePolicy) -> bytes:
    """The image at `url` under `policy` (no overall time limit here: the caller sets one)."""
    current = url
    # a client per fetch: each connects to its own checked address, so no pool is shared; no proxy
    # from the environment (it would connect instead of us, past the address check)
    async with httpx.AsyncClient(
        verify=_tls(), trust_env=False, follow_redirects=False, timeout=policy.timeout_s
    ) as client:
        for hop in range(MAX_REDIRECTS + 1):
            try:
                target = _check(current, policy)
            except ImageFetchError as e:  # every hop is checked as the first was
                raise ImageFetchError(f"redirected to {current}: {e}" if hop else str(e)) from None
            host = _host(target)
            address = await _address(host, target.port or _default_port(target))
            pinned = target.copy_with(host=address)
            headers = {
                "Host": target.netloc.decode("ascii"),
                "Accept": "image/*",
                "Accept-Encoding": "identity",
            }
            extensions = {"sni_hostname": host} if target.scheme == "https" else {}
            try:
                async with client.stream("GET", pinned, headers=headers, extensions=extensions) as r:
                    if r.status_code in _REDIRECTS:
                        location = r.headers.get("location")
                        if not location:
                            raise ImageFetchError(
                                f"the image host answered {r.status_code} without a Location"
                            )
                        current = str(target.join(location))
                        continue
                    return await _body(r, policy)
            except httpx.TimeoutException:
                raise asyncio.TimeoutError from None  # the caller's message
            except httpx.HTTPError as e:
                raise ImageFetchError(f"could not fetch the image: {type(e).__name__}: {e}") from None
    raise ImageFetchError(f"more than {MAX_REDIRECTS} redirects")


def _host(url: httpx.URL) -> str:
    return _normalize(url.raw_host.decode("ascii"))  # IDNA (ASCII) form of a name


def _check(url: str, policy: ImagePolicy) -> httpx.URL:
    try:
        target = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as e:
        raise ImageFetchError(f"invalid image URL: {e}") from None
    schemes = ("https", "http") if policy.allow_http else ("https",)
    if target.scheme not in schemes:
        raise ImageFetchError(
            f"image URLs must use {' or '.join(schemes)}, got {target.scheme or 'no scheme'!r}: {url}"
        )
    if target.userinfo:
        raise ImageFetchError("image URLs must not carry credentials")
    if not target.host:
        raise ImageFetchError(f"the image URL has no host: {url}")
    if _host(target) not in policy.allowed_hosts:
        raise ImageFetchError(f"the host {target.host!r} is not on this server's list of image hosts")
    return target


async def _address(host: str, port: int) -> str:
    """The address to connect to. A listed IP address is taken as it is; a listed name must resolve
    to public (global) addresses only."""
    if _is_ip(host):
        return host
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise ImageFetchError(f"cannot resolve the image host {host!r}: {e}") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    private = [a for a in addresses if not a.is_global]
    if not addresses:
        raise ImageFetchError(f"the image host {host!r} has no address")
    if private:
        raise ImageFetchError(
            f"the image host {host!r} resolves to a non-public address ({private[0]}); "
            "list the address itself to allow an internal host"
        )
    return str(addresses[0])


def _default_port(url: httpx.URL) -> int:
    return 443 if url.scheme == "https" else 80


async def _body(r: httpx.Response, policy: ImagePolicy) -> bytes:
    if r.status_code != 200:
        raise ImageFetchError(f"the image host answered HTTP {r.status_code}")
    kind = r.headers.get("content-type", "").split(";")[0].strip().lower()
    if not kind.startswith("image/"):
        raise ImageFetchError(f"the URL is not an image (Content-Type {kind or 'missing'!r})")
    limit = policy.max_bytes
    length = r.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ImageFetchError(f"the image is {int(length)} bytes; at most {limit} are accepted")
    chunks, size = [], 0
    async for chunk in r.aiter_bytes():
        size += len(chunk)
        if size > limit:  # streamed: the rest is never read
            raise ImageFetchError(f"the image is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
