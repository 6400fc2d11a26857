#!/usr/bin/env python3
"""An independent peer site ("site P") for chipsite's peer gateway.

Written from docs/protocol.md alone (sections 1-7 and 14), without reading the
site's source, to check that the document is enough to write a compatible peer.

Usage:
    peer_client.py '<tally ticket URI or JSON>' [--chip-id pybob]
                   [--host 127.0.0.1] [--port 1] [--extra] [--tally]
                   [--timeout 15]

Given a tally ticket issued by a chipsite site ("site A"), it:

 1. makes its own site key (P-256), a self-signed CA certificate of it
    (basicConstraints CA, pathlen 0) and a short-lived leaf signed by the site
    key (14.1); the chain it presents is [leaf, site certificate];
 2. makes the ticket connection (14.2): TLS 1.3 with that chain, checks A's
    leaf against the ticket's key `k` before sending a byte (14.1, 7), sends
    `introduce` and prints the answer (no answer: prints "refused", exits 3);
 3. opens a peer session (14.3) for the same user: SNI built from the CHIP ID,
    same chain, same check of A's leaf, then `ping`, an unknown method
    (expects -32601, section 4) and `ping` again (section 3: the session stays
    open);
 4. a negative check (14.3): a session named for a user A never learned
    (`nobody`) must be dropped right after the ClientHello: not one byte
    back, no ServerHello.
    With --extra it also probes 14.3's other claims: misspelt session names
    (other splits, odd digits, not a CHIP ID) are closed after the
    ClientHello, and another key for a known CHIP ID fails the handshake.
 5. with --tally (once steps 1-4 passed), tally steps (14.5) over a peer
    session acting for the same user. First of all (before step 1) it
    checks its own RFC 8785 canonical form against the test vector of 14.4
    (canonical bytes, the signature, RFC 6979, the hash, the idempotency
    key). Then it makes a P-256 *user* key for the user (not the site key)
    and sends `tally.step` with a signed `tally.offer` (seq 1, from the user
    at P's site pin, to the ticket's user at the pin of `k`, terms
    {"limit":5000,"units":"mCHIP"}): expects state "offered", duplicate
    false; the same request again: duplicate true. Then steps A must refuse,
    each with the code 14.5 gives and the session still open after it (a
    `ping`): a doc altered after signing (-32001), an idempotency_key that
    is not the step's own (-32602), an accept signed by the offerer
    (-32006), another offer under the same tally id (-32006), an offer to a
    user the user has no link with, `nobody` (-32001), a close before the
    accept (-32006), a doc with an unknown member (-32602); then the offer
    once more (still duplicate true, still "offered"). With --extra as well:
    the recorded offer altered after signing (-32001 or -32006), a step
    from another user than the session's (-32001), to another site
    (-32602), a reject by the offerer (-32006), a close on a tally A does
    not have (-32004), and an offer written with seq 1.0 and at_ms as a
    float (14.5: accepted; this makes a second tally at A).
    At the end it prints three lines for a caller to check what A recorded:
        tally <tally id>
        offer-hash <base64url SHA-256 of the canonical offer>
        user-key <base64url SPKI DER of the user's key>

Each step prints one line beginning with "ok " or "FAIL "; the exit status is
0 only if every step matched the document (3 if the introduction was refused,
1 for any other failure, the --tally ones included, 2 for bad arguments or a
malformed ticket).

Every run makes a new site key. Site A never replaces the key it learned for
a CHIP ID at a host (14.2), so a second run against the same site A with the
same --chip-id and --host is refused (exit 3) by design: vary one of them.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import json
import os
import re
import socket
import ssl
import sys
import tempfile
import time

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID

# Section 6: a CHIP ID is 1 to 64 of a-z 0-9 . _ -, starting with a letter or digit.
CHIP_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# Section 6: a token is 43 characters of base64url (256 bits).
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")
# Section 14.2: `host` is 1-255 of letters, digits and . - : [ ]
HOST_RE = re.compile(r"^[A-Za-z0-9.\-:\[\]]{1,255}$")
# Section 2: a frame is at most 65,536 bytes, not counting the line end.
MAX_FRAME = 65536
# Section 14.3: the suffix of a peer session's server name.
SESSION_SUFFIX = ".peer.chipsite.invalid"

failures = 0


def ok(step: str, detail: str = "") -> None:
    print(f"ok {step}" + (f": {detail}" if detail else ""), flush=True)


def fail(step: str, detail: str = "") -> None:
    global failures
    failures += 1
    print(f"FAIL {step}" + (f": {detail}" if detail else ""), flush=True)


class Refused(Exception):
    """The connection ended without an answer (14.2: treat it as "refused")."""


class BadServer(Exception):
    """The server's leaf failed the checks of section 7 / 14.1."""


# --------------------------------------------------------------------------
# Section 5: keys on the wire.
# --------------------------------------------------------------------------

def b64url(data: bytes) -> str:
    """base64url without padding (section 5)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    """Strict base64url without padding (section 5)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text) or len(text) % 4 == 1:
        raise ValueError("not base64url without padding")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def spki_der(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def pin_of(der: bytes) -> str:
    """curl-style pin: sha256//<standard base64 of SHA-256 of the SPKI DER> (section 5)."""
    return "sha256//" + base64.b64encode(hashlib.sha256(der).digest()).decode("ascii")


def load_site_key(text: str) -> ec.EllipticCurvePublicKey:
    """A site key `k`: SPKI DER of a P-256 key, base64url (sections 5, 6)."""
    key = serialization.load_der_public_key(unb64url(text))
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("site key is not a P-256 key")
    return key


# --------------------------------------------------------------------------
# Section 6: the tally ticket.
# --------------------------------------------------------------------------

def parse_tally_ticket(text: str) -> dict:
    """Parse a tally ticket, URI or JSON form (section 6).

    URI: chipsite:tally?c=&h=&p=&t=&k=&e= ; values as issued, never
    percent-encoded; any order; unknown parameters ignored; a repeated
    parameter makes it malformed.
    JSON: {"kind":"tally","chip_id",...,"host","port","token","site_key","pin"?,"expires"}.
    """
    text = text.strip()
    if text.startswith("{"):
        obj = json.loads(text)
        if obj.get("kind") != "tally":
            raise ValueError("not a tally ticket (kind)")
        # ASSUMPTION (gap): section 6 lists the required members of the *user*
        # ticket's JSON only; for the tally JSON we require all but `pin`.
        fields = {
            "c": obj["chip_id"], "h": obj["host"], "p": obj["port"],
            "t": obj["token"], "k": obj["site_key"], "e": obj["expires"],
        }
        if "pin" in obj and obj["pin"] != pin_of(unb64url(obj["site_key"])):
            raise ValueError("pin does not match site_key")
        if not isinstance(fields["p"], int) or not isinstance(fields["e"], int):
            raise ValueError("port and expires must be integers")
        port, expires = fields["p"], fields["e"]
    else:
        prefix = "chipsite:tally?"
        if not text.startswith(prefix):
            raise ValueError("not a chipsite:tally? URI")
        fields = {}
        for part in text[len(prefix):].split("&"):
            name, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"parameter without '=': {part!r}")
            if name in fields:
                raise ValueError(f"repeated parameter {name!r}")
            fields[name] = value
        for name in "chtpke":
            if name not in fields:
                raise ValueError(f"missing parameter {name!r}")
        if not re.fullmatch(r"[0-9]{1,5}", fields["p"]) or not re.fullmatch(r"[0-9]{1,20}", fields["e"]):
            raise ValueError("p and e must be decimal integers")
        port, expires = int(fields["p"]), int(fields["e"])
    if not CHIP_ID_RE.fullmatch(fields["c"]):
        raise ValueError("c is not a CHIP ID")
    if not fields["h"]:
        raise ValueError("empty host")
    if not 1 <= port <= 65535:
        raise ValueError("port out of range")
    if not TOKEN_RE.fullmatch(fields["t"]):
        raise ValueError("token is not 43 characters of base64url")
    key = load_site_key(fields["k"])
    # 14.2 step 1: the dialing site checks that `e` is not past.
    if expires <= time.time():
        raise ValueError("ticket expired")
    return {"user": fields["c"], "host": fields["h"], "port": port, "token": fields["t"],
            "k_text": fields["k"], "k": key, "expires": expires}


# --------------------------------------------------------------------------
# Section 14.1: P's own site chain [leaf, site certificate].
# --------------------------------------------------------------------------

def make_site_chain(workdir: str, host: str):
    """Make P's site key, its self-signed CA certificate and a leaf it signs.

    14.1 / 7: the site certificate is a self-signed CA certificate (path length
    0) of the site key; the leaf holds its own P-256 key, is short-lived and is
    signed (ecdsa-with-SHA256) by the site key.
    ASSUMPTION (gap): 14.1 says nothing about the names, serial numbers or
    extensions the *client's* certificates must carry (section 9 says "any
    extensions" for apps, 14.1 does not); we use ordinary ones: a CA site
    certificate, a leaf whose issuer is the site certificate's subject, with
    CA:FALSE, digitalSignature, serverAuth+clientAuth and a SAN of our host.
    """
    now = dt.datetime.now(dt.timezone.utc)
    site_key = ec.generate_private_key(ec.SECP256R1())
    site_name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "peer_client.py"),
        x509.NameAttribute(NameOID.COMMON_NAME, "peer_client.py site"),
    ])
    site_cert = (
        x509.CertificateBuilder()
        .subject_name(site_name).issuer_name(site_name)
        .public_key(site_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(site_key.public_key()), critical=False)
        .sign(site_key, hashes.SHA256())
    )

    leaf_key = ec.generate_private_key(ec.SECP256R1())
    try:
        import ipaddress
        san = x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        san = x509.DNSName(host)
    leaf_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "peer_client.py gateway")]))
        .issuer_name(site_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        # Back-dated 5 minutes like the site's own leaves (section 7), short-lived.
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(site_key.public_key()),
                       critical=False)
        .sign(site_key, hashes.SHA256())  # ecdsa-with-SHA256, as 14.1 check 2 wants
    )
    assert leaf_cert.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA256

    # Python's ssl loads a chain from files: the leaf first, then the chain.
    chain_path = os.path.join(workdir, "chain.pem")
    key_path = os.path.join(workdir, "leaf.key")
    with open(chain_path, "wb") as f:
        f.write(leaf_cert.public_bytes(serialization.Encoding.PEM))
        f.write(site_cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(leaf_key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return site_key, chain_path, key_path


# --------------------------------------------------------------------------
# Sections 1, 7, 14.1: TLS 1.3 with our chain, and the check of A's leaf.
# --------------------------------------------------------------------------

def tls_context(chain_path: str, key_path: str) -> ssl.SSLContext:
    """TLS 1.3 only (section 1), our chain as client certificate (14.1).

    Section 7 "custom verifier" route: no CA validation by the TLS library
    (CERT_NONE, no host name check: 14.1 "Host names are not checked"); we
    check the leaf ourselves right after the handshake, before sending.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(chain_path, key_path)
    return ctx


def check_server_leaf(sock: ssl.SSLSocket, k: ec.EllipticCurvePublicKey) -> x509.Certificate:
    """Section 7 checks 1-3 / 14.1 checks 2-4 on the server's leaf.

    14.1 check 1 (the chain's second certificate holds `k`) cannot be done:
    Python before 3.13 only gives the leaf. Checking that `k` signed the leaf
    gives the same trust (section 7, "a custom verifier").
    """
    der = sock.getpeercert(binary_form=True)
    if not der:
        raise BadServer("server sent no certificate")
    leaf = x509.load_der_x509_certificate(der)
    # Check 1: ecdsa-with-SHA256, and the signature verifies with k over tbsCertificate.
    if leaf.signature_algorithm_oid != SignatureAlgorithmOID.ECDSA_WITH_SHA256:
        raise BadServer(f"leaf signature algorithm is {leaf.signature_algorithm_oid.dotted_string}")
    try:
        k.verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise BadServer("leaf is not signed by the ticket's site key k") from None
    # Check 2: now within the leaf's validity period.
    now = dt.datetime.now(dt.timezone.utc)
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise BadServer(f"leaf not valid now ({leaf.not_valid_before_utc} .. {leaf.not_valid_after_utc})")
    # Check 3: the TLS 1.3 handshake succeeded, so the server holds the leaf's key.
    if sock.version() != "TLSv1.3":
        raise BadServer(f"negotiated {sock.version()}, not TLS 1.3")
    return leaf


def connect(ctx: ssl.SSLContext, host: str, port: int, server_name: str | None,
            k: ec.EllipticCurvePublicKey, timeout: float) -> ssl.SSLSocket:
    """TCP + TLS 1.3 handshake + server check. Nothing is sent after the handshake."""
    raw = socket.create_connection((host.strip("[]"), port), timeout=timeout)
    try:
        # suppress_ragged_eofs=False: tell a TLS close_notify (recv -> b"") from
        # a bare TCP close (SSLEOFError), which 14.2 distinguishes.
        sock = ctx.wrap_socket(raw, server_hostname=server_name, suppress_ragged_eofs=False)
    except BaseException:
        raw.close()
        raise
    try:
        check_server_leaf(sock, k)
    except BaseException:
        sock.close()  # close without sending anything
        raise
    return sock


class Frames:
    """Line frames (section 2) over a TLS socket."""

    def __init__(self, sock: ssl.SSLSocket):
        self.sock = sock
        self.buf = b""
        self.eof = None  # how the stream ended: "close_notify", or an error text

    def send(self, obj: dict) -> None:
        line = json.dumps(obj, separators=(",", ":")).encode("utf-8")
        assert len(line) <= MAX_FRAME
        self.sock.sendall(line + b"\n")

    def read_line(self) -> bytes | None:
        """The next frame (without its line end), or None when the stream ended."""
        while b"\n" not in self.buf:
            if self.eof is not None:
                return None
            try:
                data = self.sock.recv(65536)
            except ssl.SSLEOFError as e:
                self.eof = f"TCP close without close_notify ({e.reason or e})"
                continue
            except ssl.SSLError as e:
                self.eof = f"TLS error {e.reason or e}"
                continue
            except (ConnectionError, socket.timeout, OSError) as e:
                self.eof = f"{type(e).__name__}: {e}"
                continue
            if not data:
                self.eof = "close_notify"
                continue
            self.buf += data
            if len(self.buf) > 4 * MAX_FRAME:
                raise ValueError("server frame too long")
        line, _, self.buf = self.buf.partition(b"\n")
        return line[:-1] if line.endswith(b"\r") else line

    def call(self, obj: dict) -> tuple[bytes, dict]:
        self.send(obj)
        line = self.read_line()
        if line is None:
            raise Refused(self.eof)
        return line, json.loads(line)


# --------------------------------------------------------------------------
# Section 14.3: the peer session's server name.
# --------------------------------------------------------------------------

def session_server_name(chip_id: str) -> str:
    """The CHIP ID's bytes in lowercase hex, split into labels of at most 62
    digits, followed by .peer.chipsite.invalid (14.3).

    ASSUMPTION: the split is from the left (62, 62, then the rest), as the
    document's 64-character example (62, 62 and 4 digits) implies.
    """
    digits = chip_id.encode("ascii").hex()
    labels = [digits[i:i + 62] for i in range(0, len(digits), 62)]
    return ".".join(labels) + SESSION_SUFFIX


def dropped_after_client_hello(ctx: ssl.SSLContext, host: str, port: int,
                               server_name: str, timeout: float) -> tuple[bool, str]:
    """Send one ClientHello with `server_name` and see what comes back.

    14.3: a name that is not a session name, or names an unknown CHIP ID, is
    "dropped right after the ClientHello (no ServerHello)". Done over a memory
    BIO so that we see every byte: the document holds if the server sends
    nothing at all and closes.
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    if server_name.encode("ascii") not in hello:
        return False, f"our ClientHello does not carry the name {server_name!r} as written"
    received = b""
    how = ""
    with socket.create_connection((host.strip("[]"), port), timeout=timeout) as raw:
        raw.sendall(hello)
        try:
            while True:
                data = raw.recv(65536)
                if not data:
                    how = "TCP close (FIN)"
                    break
                received += data
        except ConnectionResetError:
            how = "TCP reset"
        except socket.timeout:
            how = f"still open after {timeout:.0f} s"
    if received:
        kind = {0x15: "a TLS alert", 0x16: "a handshake record (ServerHello)"}.get(received[0], "bytes")
        return False, f"server sent {len(received)} bytes ({kind}) then {how}"
    if how.startswith("still open"):
        return False, f"no answer but the connection was {how}"
    return True, f"no byte back, {how}"


# --------------------------------------------------------------------------
# Section 14.4: signed documents (RFC 8785 canonical form, ES256 as r || s).
# --------------------------------------------------------------------------

def es_number(x) -> str:
    """A JSON number as ECMAScript writes it (RFC 8785 section 3.2.2.3).

    14.4: `1e5` and `100000.0` both become `100000`; integers within +-2^53.
    """
    if isinstance(x, bool):
        raise TypeError("a bool is not a number")
    if isinstance(x, int):
        if abs(x) > 2 ** 53:
            raise ValueError(f"integer {x} outside +-2^53 (14.4)")
        return str(x)
    if not isinstance(x, float) or x != x or x in (float("inf"), float("-inf")):
        raise ValueError(f"not a finite number: {x!r}")
    if x == 0:
        return "0"  # -0 too
    sign = "-" if x < 0 else ""
    # Python's repr is the shortest string that reads back as the same double,
    # which is what ECMAScript's Number::toString picks its digits from.
    mantissa, _, exp = repr(abs(x)).partition("e")
    whole, _, frac = mantissa.partition(".")
    digits = (whole + frac).lstrip("0")
    q = (int(exp) if exp else 0) - len(frac)  # value = int(digits) * 10^q
    stripped = digits.rstrip("0")
    q += len(digits) - len(stripped)
    digits = stripped
    k = len(digits)
    n = q + k  # value = 0.d1d2...dk * 10^n
    if k <= n <= 21:
        return sign + digits + "0" * (n - k)
    if 0 < n <= 21:
        return sign + digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return sign + "0." + "0" * (-n) + digits
    e = n - 1
    e_text = ("+" if e >= 0 else "-") + str(abs(e))
    if k == 1:
        return sign + digits + "e" + e_text
    return sign + digits[0] + "." + digits[1:] + "e" + e_text


def canonical(value) -> str:
    """RFC 8785 (JCS) text of a JSON value (14.4): members sorted by the UTF-16
    code units of their names, no white space, ECMAScript numbers, strings with
    only the escapes JSON requires (Python's json with ensure_ascii=False
    escapes exactly ", \\, \\b \\f \\n \\r \\t and other controls as \\u00xx)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, (int, float)):
        return es_number(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ",".join(canonical(v) for v in value) + "]"
    if isinstance(value, dict):
        names = sorted(value, key=lambda name: name.encode("utf-16-be"))
        return "{" + ",".join(json.dumps(n, ensure_ascii=False) + ":" + canonical(value[n])
                              for n in names) + "}"
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def canonical_bytes(value) -> bytes:
    # UTF-8, strict: a lone surrogate cannot be canonicalized.
    return canonical(value).encode("utf-8")


def no_duplicates(pairs):
    obj = {}
    for name, value in pairs:
        if name in obj:
            raise ValueError(f"duplicate member {name!r}")
        obj[name] = value
    return obj


def doc_hash(doc: dict) -> str:
    """14.4/14.5: base64url (no padding) of the SHA-256 of the canonical form."""
    return b64url(hashlib.sha256(canonical_bytes(doc)).digest())


def sign_doc(key: ec.EllipticCurvePrivateKey, doc: dict) -> str:
    """14.4: ECDSA P-256 SHA-256 over the canonical bytes, as base64url r || s."""
    r, s = decode_dss_signature(key.sign(canonical_bytes(doc), ec.ECDSA(hashes.SHA256())))
    return b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def verify_doc(public_key: ec.EllipticCurvePublicKey, sig: str, doc: dict) -> bool:
    raw = unb64url(sig)
    if len(raw) != 64:
        return False
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    try:
        public_key.verify(der, canonical_bytes(doc), ec.ECDSA(hashes.SHA256()))
        return True
    except InvalidSignature:
        return False


def envelope(key: ec.EllipticCurvePrivateKey, doc: dict) -> dict:
    """14.5: {"doc", "sig", "signer_key"}, at most 8,192 bytes of JSON."""
    env = {"doc": doc, "sig": sign_doc(key, doc), "signer_key": b64url(spki_der(key.public_key()))}
    assert len(json.dumps(env, separators=(",", ":")).encode("utf-8")) <= 8192
    return env


def idempotency_key(doc: dict) -> str:
    """14.5: `<from.site>/<tally>/<seq>`.

    ASSUMPTION (gap): the document does not say how `seq` is written in the
    key when the doc writes it as 1.0 or 1e0; we use its canonical form.
    """
    return f"{doc['from']['site']}/{doc['tally']}/{es_number(doc['seq'])}"


# The test vector of section 14.4, as the document gives it.
VECTOR_PRIVATE_HEX = "c9afa9d845ba75166b5c215767b1d6934e50c3db36e89b127b8a622b120f6721"
VECTOR_PUBLIC = ("MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEYP7UuiVanTHJYet0xjVtaMBJuJI7Yfps5mliLmDyn7Z5A_4QCLi8"
                 "maQa6elWKLxk8vGyDC1-n1F3o8KU1EYimQ")
VECTOR_DOC = r"""{ "type": "tally.offer", "at_ms": 1.7645472E12, "seq": 1.0, "tally": "tly_00000000000000000001",
    "to": {"site": "sha256//b4fXk2yLbqOvfVgD8vEulvXFrBKvdEYfKKL9Wy8fv+k=", "chip_id": "bob"},
    "from": {"site": "sha256//rcIpLAdF7OaPy855fra5qldHft46M3FeSpMiWq2SLlA=", "chip_id": "alice"},
    "terms": {"units": "mCHIP", "note": "Gr\u00fc\u00dfe, caf\u00e9 \u20ac", "limit": 1e5} }"""
VECTOR_CANONICAL = (
    '{"at_ms":1764547200000,"from":{"chip_id":"alice","site":"sha256//rcIpLAdF7OaPy855fra5qldHft46M3FeSpMiWq2SLlA="},'
    '"seq":1,"tally":"tly_00000000000000000001","terms":{"limit":100000,"note":"Gr\u00fc\u00dfe, caf\u00e9 \u20ac",'
    '"units":"mCHIP"},"to":{"chip_id":"bob","site":"sha256//b4fXk2yLbqOvfVgD8vEulvXFrBKvdEYfKKL9Wy8fv+k="},'
    '"type":"tally.offer"}').encode("utf-8")
VECTOR_SIG = "dgo9hiUJNJ1rI9v7AcWy3MqFJ3bOUwPK7gKS4D2wUtwseuPq4cqz2x3dbyyYDUTLOBh2E-C2l26DHqrY5m2cLw"
VECTOR_HASH = "VRbqZlbLEuDamLSITF3meT2rWEvZwlR6JfhM_aV_QYY"
VECTOR_KEY = "sha256//rcIpLAdF7OaPy855fra5qldHft46M3FeSpMiWq2SLlA=/tly_00000000000000000001/1"


def vector_checks() -> None:
    """--tally, first of all: our canonical form, signatures and hashes against 14.4's vector."""
    private = ec.derive_private_key(int(VECTOR_PRIVATE_HEX, 16), ec.SECP256R1())
    if b64url(spki_der(private.public_key())) == VECTOR_PUBLIC:
        ok("vector key", "the private key's SPKI is the documented public key")
    else:
        fail("vector key", "the documented public key is not the private key's")
    public = load_site_key(VECTOR_PUBLIC)
    doc = json.loads(VECTOR_DOC, object_pairs_hook=no_duplicates)
    got = canonical_bytes(doc)
    if got == VECTOR_CANONICAL and len(got) == 330:
        ok("vector canonical form", f"{len(got)} bytes, as documented")
    else:
        fail("vector canonical form", f"{len(got)} bytes: {got.decode('utf-8', 'replace')}")
    if verify_doc(public, VECTOR_SIG, doc):
        ok("vector signature", "the documented signature verifies with the documented key")
    else:
        fail("vector signature", "the documented signature does not verify over our canonical bytes")
    # 14.4: chipsite signs deterministically (RFC 6979): so can we, to compare.
    try:
        r, s = decode_dss_signature(private.sign(
            got, ec.ECDSA(hashes.SHA256(), deterministic_signing=True)))
        mine = b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
        (ok if mine == VECTOR_SIG else fail)("vector RFC 6979", f"our deterministic signature {mine}")
    except (TypeError, ValueError, AttributeError) as e:  # older cryptography/OpenSSL
        ok("vector RFC 6979", f"skipped, no deterministic signing here: {e}")
    h = doc_hash(doc)
    (ok if h == VECTOR_HASH else fail)("vector hash", h)
    key = idempotency_key(doc)
    (ok if key == VECTOR_KEY else fail)("vector idempotency key", key)


# --------------------------------------------------------------------------
# Section 14.5: tally steps over a peer session (tally.step).
# --------------------------------------------------------------------------

class PeerSession:
    """A peer session (14.3) for one user, opened again if the site closed it."""

    def __init__(self, ctx, t: dict, chip_id: str, timeout: float):
        self.ctx, self.t, self.chip_id, self.timeout = ctx, t, chip_id, timeout
        self.sock = None
        self.frames = None
        self.next_id = 1

    def open(self) -> None:
        name = session_server_name(self.chip_id)
        self.sock = connect(self.ctx, self.t["host"], self.t["port"], name, self.t["k"], self.timeout)
        self.frames = Frames(self.sock)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = self.frames = None

    def call(self, method: str, params: dict | None = None) -> tuple[int, str, dict]:
        """One request; returns (id, line, answer). Raises Refused if the session ended."""
        if self.frames is None:
            self.open()
        rid = self.next_id
        self.next_id += 1
        request = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            request["params"] = params
        try:
            line, answer = self.frames.call(request)
        except Refused:
            self.close()
            raise
        if not isinstance(answer, dict) or answer.get("id") != rid:
            raise ValueError(f"answer for another id: {line[:300]!r}")
        return rid, line.decode("utf-8", "replace"), answer

    def still_open(self) -> tuple[bool, str]:
        """Section 3: the session stays open after an error response: ping on it."""
        if self.frames is None:
            return False, "the site closed the session"
        try:
            _, line, answer = self.call("ping")
        except Refused as e:
            return False, f"the site closed the session ({e})"
        if answer.get("result") == {"pong": True}:
            return True, "session still open"
        return False, f"ping after the error got {line}"


def now_ms() -> int:
    return int(time.time() * 1000)


def new_tally_id() -> str:
    """14.5: `tly_` and 1 ... 60 of A-Z a-z 0-9 _ -; 16 random bytes in base64url."""
    return "tly_" + b64url(os.urandom(16))


def tally_checks(ctx, t: dict, chip_id: str, p_pin: str, timeout: float, extra: bool) -> None:
    """--tally: site P's user `chip_id` offers a tally to A's user t["user"] (14.5)."""
    a_pin = pin_of(unb64url(t["k_text"]))  # the pin of the ticket's key k (section 5)
    user_key = ec.generate_private_key(ec.SECP256R1())  # pybob's own key, not the site key
    user_key_text = b64url(spki_der(user_key.public_key()))
    me = {"chip_id": chip_id, "site": p_pin}
    them = {"chip_id": t["user"], "site": a_pin}
    terms = {"limit": 5000, "units": "mCHIP"}

    def offer(tally_id: str, terms: dict = terms, to: dict = them, frm: dict = me) -> dict:
        return {"type": "tally.offer", "tally": tally_id, "seq": 1, "from": frm, "to": to,
                "terms": terms, "at_ms": now_ms()}

    def params_for(env: dict, key: str | None = None) -> dict:
        return {"idempotency_key": key or idempotency_key(env["doc"]), "step": env}

    tally_id = new_tally_id()
    offer_doc = offer(tally_id)
    offer_env = envelope(user_key, offer_doc)
    offer_params = params_for(offer_env)
    offer_hash = doc_hash(offer_doc)
    session = PeerSession(ctx, t, chip_id, timeout)

    def expect_result(step: str, params: dict, result: dict) -> None:
        try:
            _, line, answer = session.call("tally.step", params)
        except Refused as e:
            fail(step, f"the connection ended without an answer: {e}")
            return
        except (BadServer, OSError, ssl.SSLError, ValueError) as e:
            fail(step, f"{type(e).__name__}: {e}")
            return
        if answer.get("result") == result and "error" not in answer:
            ok(step, line)
        else:
            fail(step, f"expected result {json.dumps(result, separators=(',', ':'))}, got {line}")

    def expect_error(step: str, params: dict, codes: tuple[int, ...], why: str) -> None:
        try:
            _, line, answer = session.call("tally.step", params)
        except Refused as e:
            fail(step, f"{why}: the connection ended without an answer: {e}")
            return
        except (BadServer, OSError, ssl.SSLError, ValueError) as e:
            fail(step, f"{why}: {type(e).__name__}: {e}")
            return
        err = answer.get("error")
        if "result" in answer or not isinstance(err, dict) or err.get("code") not in codes:
            fail(step, f"{why}: expected {' or '.join(map(str, codes))}, got {line}")
            return
        alive, detail = session.still_open()
        (ok if alive else fail)(step, f"{why}: {err.get('code')} {err.get('message')!r}; {detail}")
        if not alive:
            session.close()

    try:
        # 1. The offer (14.5): the responder records it, state "offered".
        expect_result("tally offer", offer_params,
                      {"tally": tally_id, "seq": 1, "state": "offered", "duplicate": False})
        # 2. The same step again: the same answer, with duplicate true.
        expect_result("tally offer again", offer_params,
                      {"tally": tally_id, "seq": 1, "state": "offered", "duplicate": True})

        # 3. Steps the document says A refuses. Each one that is not about this
        # tally uses a fresh tally id, so that it has one fault only (14.5 does
        # not say in which order a site checks).
        doc = offer(new_tally_id())
        env = envelope(user_key, doc)
        env["doc"] = dict(doc, terms={"limit": 500000, "units": "mCHIP"})
        expect_error("tally altered doc", params_for(env), (-32001,),
                     "terms changed after signing")

        doc = offer(new_tally_id())
        expect_error("tally foreign idempotency key",
                     params_for(envelope(user_key, doc), f"{p_pin}/{doc['tally']}/2"), (-32602,),
                     "a signed offer sent under the key of step 2")

        accept = {"type": "tally.accept", "tally": tally_id, "seq": 2, "from": me, "to": them,
                  "prev": offer_hash, "at_ms": now_ms()}
        expect_error("tally accept by offerer", params_for(envelope(user_key, accept)), (-32006,),
                     "only the recipient accepts")

        other = offer(tally_id, terms={"limit": 9999, "units": "mCHIP"})
        expect_error("tally other offer same id", params_for(envelope(user_key, other)), (-32006,),
                     "another offer under an id in use")

        doc = offer(new_tally_id(), to={"chip_id": "nobody", "site": a_pin})
        expect_error("tally unlinked user", params_for(envelope(user_key, doc)), (-32001,),
                     "to.chip_id nobody has no link with " + chip_id)

        close = {"type": "tally.close", "tally": tally_id, "seq": 3, "from": me, "to": them,
                 "prev": offer_hash, "at_ms": now_ms()}
        expect_error("tally close before accept", params_for(envelope(user_key, close)), (-32006,),
                     "a close before the accept")

        doc = dict(offer(new_tally_id()), memo="not a member of 14.5")
        expect_error("tally unknown member", params_for(envelope(user_key, doc)), (-32602,),
                     "a doc member 14.5 does not list")

        if extra:
            tally_extra_checks(session, expect_result, expect_error, user_key, offer, params_for,
                               offer_env, offer_doc, p_pin, me, them)

        # None of the refused steps changed the tally: the offer still answers
        # as the first time.
        expect_result("tally offer unchanged", offer_params,
                      {"tally": tally_id, "seq": 1, "state": "offered", "duplicate": True})
    finally:
        session.close()

    # 4. For the caller (tests/tests/*.rs) to check what site A recorded.
    print(f"tally {tally_id}")
    print(f"offer-hash {offer_hash}")
    print(f"user-key {user_key_text}", flush=True)


def tally_extra_checks(session, expect_result, expect_error, user_key, offer, params_for,
                       offer_env, offer_doc, p_pin, me, them) -> None:
    """--tally --extra: further 14.5 claims. Makes a second tally at A."""
    # The recorded offer, altered after signing, under its own (recorded) key:
    # a bad signature (-32001) and "another step under the same key" (-32006)
    # both apply; 14.5 does not say which a site checks first.
    env = dict(offer_env, doc=dict(offer_doc, terms={"limit": 1, "units": "mCHIP"}))
    expect_error("extra tally altered replay", params_for(env), (-32001, -32006),
                 "the recorded offer altered after signing (either code fits 14.5)")
    # from.chip_id another user than the one the session names: -32001.
    doc = offer(new_tally_id(), frm={"chip_id": "pyeve", "site": p_pin})
    expect_error("extra tally other signer", params_for(envelope(user_key, doc)), (-32001,),
                 "from.chip_id is not the session's user")
    # to.site not A's pin: "do not name this site", -32602.
    stranger = pin_of(spki_der(ec.generate_private_key(ec.SECP256R1()).public_key()))
    doc = offer(new_tally_id(), to=dict(them, site=stranger))
    expect_error("extra tally other site", params_for(envelope(user_key, doc)), (-32602,),
                 "to.site is not this site's pin")
    # A reject from the offerer: only the recipient rejects, -32006.
    reject = {"type": "tally.reject", "tally": offer_doc["tally"], "seq": 2, "from": me, "to": them,
              "prev": doc_hash(offer_doc), "at_ms": now_ms()}
    expect_error("extra tally reject by offerer", params_for(envelope(user_key, reject)), (-32006,),
                 "only the recipient rejects")
    # A close on a tally A does not have: -32004.
    close = {"type": "tally.close", "tally": new_tally_id(), "seq": 3, "from": me, "to": them,
             "prev": b64url(os.urandom(32)), "at_ms": now_ms()}
    expect_error("extra tally close unknown tally", params_for(envelope(user_key, close)), (-32004,),
                 "a close on a tally this site does not have")
    # Whole numbers written as 1.0 and 1e12 (14.5: "any way JSON allows"):
    # signed over the canonical form, the key written with seq 1.
    doc = offer(new_tally_id())
    doc["seq"] = 1.0
    doc["at_ms"] = float(doc["at_ms"])
    env = envelope(user_key, doc)
    key = f"{p_pin}/{doc['tally']}/1"
    expect_result("extra tally offer seq 1.0", params_for(env, key),
                  {"tally": doc["tally"], "seq": 1, "state": "offered", "duplicate": False})
    # Section 14.3: requests may be sent without waiting for answers; the
    # site answers each, in order. Four in one write: an offer, the same offer
    # altered after signing (-32001), a ping, another offer; then the first
    # offer again (duplicate) with a fifth.
    first, second = offer(new_tally_id()), offer(new_tally_id())
    altered = dict(envelope(user_key, offer(new_tally_id())))
    altered["doc"] = dict(altered["doc"], terms={"limit": 2, "units": "mCHIP"})
    batches = [
        [("tally.step", params_for(envelope(user_key, first))),
         ("tally.step", params_for(altered)),
         ("ping", None),
         ("tally.step", params_for(envelope(user_key, second)))],
        [("tally.step", params_for(envelope(user_key, first))),
         ("tally.step", params_for(envelope(user_key, offer(new_tally_id()))))],
    ]
    expected = [
        [{"tally": first["tally"], "seq": 1, "state": "offered", "duplicate": False}, -32001,
         {"pong": True}, {"tally": second["tally"], "seq": 1, "state": "offered", "duplicate": False}],
        [{"tally": first["tally"], "seq": 1, "state": "offered", "duplicate": True}, "offered"],
    ]
    for n, (batch, want) in enumerate(zip(batches, expected), 1):
        if session.frames is None:
            session.open()
        ids, lines = [], []
        for method, params in batch:
            ids.append(session.next_id)
            request = {"jsonrpc": "2.0", "id": session.next_id, "method": method}
            if params is not None:
                request["params"] = params
            session.next_id += 1
            lines.append(json.dumps(request, separators=(",", ":")).encode("utf-8") + b"\n")
        session.sock.sendall(b"".join(lines))
        answers = []
        for _ in batch:
            line = session.frames.read_line()
            if line is None:
                fail(f"extra tally pipelined {n}", f"the session ended: {session.frames.eof}")
                return
            answers.append(json.loads(line))
        if [a.get("id") for a in answers] != ids:
            fail(f"extra tally pipelined {n}", f"answers out of order: {[a.get('id') for a in answers]} for {ids}")
            continue
        bad = []
        for a, w in zip(answers, want):
            if isinstance(w, int):
                if a.get("error", {}).get("code") != w:
                    bad.append(a)
            elif isinstance(w, str):
                if a.get("result", {}).get("state") != w:
                    bad.append(a)
            elif a.get("result") != w:
                bad.append(a)
        if bad:
            fail(f"extra tally pipelined {n}", f"unexpected answers: {json.dumps(bad)[:600]}")
        else:
            ok(f"extra tally pipelined {n}", f"{len(batch)} requests in one write, answered in order")


# --------------------------------------------------------------------------
# The steps.
# --------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ticket", help="a tally ticket: chipsite:tally?c=…&h=…&p=…&t=…&k=…&e=… (or its JSON)")
    ap.add_argument("--chip-id", default="pybob", help="the user P introduces (default pybob)")
    ap.add_argument("--host", default="127.0.0.1", help="where A is told P's peer gateway is")
    ap.add_argument("--port", type=int, default=1, help="... and its port (default 1)")
    ap.add_argument("--extra", action="store_true",
                    help="also probe the other 14.3 claims (misspelt names, another key); "
                         "with --tally, more 14.5 claims too")
    ap.add_argument("--tally", action="store_true",
                    help="check the 14.4 test vector first, then take tally steps (14.5) "
                         "over a peer session: an offer to the ticket's user, and refused steps")
    ap.add_argument("--timeout", type=float, default=15.0,
                    help="seconds to wait for answers (14.2: a dialer waits at most 10 s)")
    args = ap.parse_args()

    if not CHIP_ID_RE.fullmatch(args.chip_id):
        print(f"FAIL arguments: --chip-id {args.chip_id!r} is not a CHIP ID (section 6)")
        return 2
    if not HOST_RE.fullmatch(args.host) or not 1 <= args.port <= 65535:
        print("FAIL arguments: --host/--port not valid for introduce (14.2)")
        return 2

    # With --tally, before anything else: our canonical form against 14.4's vector.
    if args.tally:
        vector_checks()

    # Step 0: the ticket (section 6).
    try:
        t = parse_tally_ticket(args.ticket)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        print(f"FAIL ticket: malformed tally ticket: {e}")
        return 2
    ok("ticket", f"user={t['user']} host={t['host']} port={t['port']} "
       f"site={pin_of(spki_der(t['k']))} expires={t['expires']}")

    with tempfile.TemporaryDirectory(prefix="peer_client.") as workdir:
        # Step 1: P's site key and chain (14.1).
        site_key, chain_path, key_path = make_site_chain(workdir, args.host)
        p_key_text = b64url(spki_der(site_key.public_key()))
        if p_key_text == t["k_text"]:  # 14.2 step 1: `k` not its own key
            print("FAIL ticket: the ticket names our own site key")
            return 2
        ctx = tls_context(chain_path, key_path)
        ok("site chain", f"site key {pin_of(spki_der(site_key.public_key()))}, chain [leaf, site certificate]")

        # Step 2: the ticket connection (14.2).
        # ASSUMPTION (gap): 14.2 does not say what server name (SNI) a ticket
        # connection sends; we send none for an IP address (Python never
        # does) and the ticket's host for a DNS name, as a TLS client would.
        try:
            sock = connect(ctx, t["host"], t["port"], t["host"].strip("[]"), t["k"], args.timeout)
        except BadServer as e:
            fail("ticket connection", f"server not trusted, token not sent: {e}")
            return 1
        except (OSError, ssl.SSLError) as e:
            fail("ticket connection", f"cannot connect: {type(e).__name__}: {e}")
            return 1
        ok("ticket connection", "TLS 1.3, A's leaf signed by k and valid now")
        with sock:
            frames = Frames(sock)
            request = {"jsonrpc": "2.0", "id": 1, "method": "introduce", "params": {
                "token": t["token"], "user": t["user"], "chip_id": args.chip_id,
                "site_key": p_key_text, "host": args.host, "port": args.port}}
            try:
                line, answer = frames.call(request)
            except Refused as e:
                # 14.2: "Treat any end without an answer as 'refused'."
                print(f"FAIL introduce: refused (the connection ended without an answer: {e})")
                return 3
            expected = {"jsonrpc": "2.0", "id": 1,
                        "result": {"introduced": True, "user": t["user"], "chip_id": args.chip_id}}
            if answer == expected:
                ok("introduce", line.decode("utf-8"))
            else:
                fail("introduce", f"unexpected answer {line.decode('utf-8', 'replace')}")
                return 1
            # 14.2: after the answer the site closes, with TLS close_notify.
            rest = frames.read_line()
            if rest is None and frames.eof == "close_notify":
                ok("introduce close", "close_notify after the answer")
            elif rest is not None:
                fail("introduce close", f"unexpected further frame {rest[:200]!r}")
            else:
                fail("introduce close", f"expected close_notify, got {frames.eof}")

        # Step 3: a peer session for the same user (14.3). After the
        # introduction A knows P's site key for chip_id; P checks A against
        # the key it learned for the link, i.e. the ticket's k.
        name = session_server_name(args.chip_id)
        try:
            sock = connect(ctx, t["host"], t["port"], name, t["k"], args.timeout)
        except BadServer as e:
            fail("session", f"server not trusted, nothing sent: {e}")
            return 1
        except (OSError, ssl.SSLError) as e:
            fail("session", f"handshake failed for {name}: {type(e).__name__}: {e}")
            return 1
        ok("session", f"SNI {name}, TLS 1.3, A's leaf signed by k and valid now")
        with sock:
            frames = Frames(sock)
            try:
                # 14.3 methods: ping, params none (or {}) -> {"pong":true}.
                # (TLS 1.3: a refused client chain may only show on this first read.)
                line, answer = frames.call({"jsonrpc": "2.0", "id": 1, "method": "ping"})
                if answer == {"jsonrpc": "2.0", "id": 1, "result": {"pong": True}}:
                    ok("ping", line.decode("utf-8"))
                else:
                    fail("ping", f"unexpected answer {line.decode('utf-8', 'replace')}")
                # Sections 3, 4, 14.3: an unknown method gets -32601 with the
                # same id, and the session stays open.
                line, answer = frames.call({"jsonrpc": "2.0", "id": 2, "method": "no.such.method"})
                err = answer.get("error") if isinstance(answer, dict) else None
                if (answer.get("jsonrpc") == "2.0" and answer.get("id") == 2 and "result" not in answer
                        and isinstance(err, dict) and err.get("code") == -32601
                        and isinstance(err.get("message"), str)):
                    ok("unknown method", line.decode("utf-8"))
                else:
                    fail("unknown method", f"expected -32601 for id 2, got {line.decode('utf-8', 'replace')}")
                # Section 3: a string id is echoed unchanged; params {} is allowed for ping.
                line, answer = frames.call({"jsonrpc": "2.0", "id": "again", "method": "ping", "params": {}})
                if answer == {"jsonrpc": "2.0", "id": "again", "result": {"pong": True}}:
                    ok("ping after error", "session still open: " + line.decode("utf-8"))
                else:
                    fail("ping after error", f"unexpected answer {line.decode('utf-8', 'replace')}")
            except Refused as e:
                fail("session", f"the connection ended without an answer: {e}")
            except (json.JSONDecodeError, AttributeError, OSError) as e:
                fail("session", f"{type(e).__name__}: {e}")

        # Step 4: the negative check (14.3). A session named for a user A never
        # learned: "An unknown CHIP ID ...: the connection is dropped right
        # after the ClientHello (no ServerHello)".
        probe_dropped(ctx, t, "unknown user", session_server_name("nobody"), args.timeout)

        if args.extra:
            extra_checks(ctx, t, args.chip_id, workdir, args.timeout)

        # Step 5 (--tally): tally steps over a peer session (14.5).
        if args.tally:
            if failures:
                fail("tally", "not tried: an earlier step failed")
            else:
                tally_checks(ctx, t, args.chip_id, pin_of(spki_der(site_key.public_key())),
                             args.timeout, args.extra)

    return 1 if failures else 0


def probe_dropped(ctx: ssl.SSLContext, t: dict, step: str, name: str, timeout: float) -> None:
    try:
        good, detail = dropped_after_client_hello(ctx, t["host"], t["port"], name, timeout)
    except OSError as e:
        good, detail = False, f"{type(e).__name__}: {e}"
    (ok if good else fail)(step, f"SNI {name}: {detail}")


def extra_checks(ctx: ssl.SSLContext, t: dict, chip_id: str, workdir: str, timeout: float) -> None:
    """--extra: further 14.3 claims about session names and keys.

    "Any other spelling (other splits, an odd number of digits, a name that
    is not a CHIP ID) is not a session name: the connection is closed after
    its ClientHello." (Capitals are read as their lower case, as DNS names
    are, so they are not probed.) And "Another key: the handshake fails (a TLS alert; in TLS
    1.3 the initiator may see it only on its first read). Either way not one
    request is read."
    """
    good = session_server_name(chip_id)
    digits = chip_id.encode("ascii").hex()
    names = [
        ("other split", digits[:2] + "." + digits[2:] + SESSION_SUFFIX),
        ("odd digits", digits + "0" + SESSION_SUFFIX),
        ("not a CHIP ID", "-".encode().hex() + "61" + SESSION_SUFFIX),  # "-a": starts with '-'
    ]
    for step, name in names:
        if name != good:
            probe_dropped(ctx, t, "extra " + step, name, timeout)

    # Another key for a CHIP ID A knows: a fresh site chain, the same name.
    other_dir = os.path.join(workdir, "other")
    os.mkdir(other_dir)
    _, chain_path, key_path = make_site_chain(other_dir, "127.0.0.1")
    other = tls_context(chain_path, key_path)
    step = "extra other key"
    try:
        sock = connect(other, t["host"], t["port"], good, t["k"], timeout)
    except BadServer as e:
        fail(step, f"server not trusted: {e}")
        return
    except (OSError, ssl.SSLError) as e:
        ok(step, f"handshake failed: {type(e).__name__}: {e}")
        return
    with sock:
        frames = Frames(sock)
        try:
            line, _ = frames.call({"jsonrpc": "2.0", "id": 1, "method": "ping"})
            fail(step, f"a request was answered: {line.decode('utf-8', 'replace')}")
        except Refused as e:
            (ok if str(e).startswith("TLS error") else fail)(
                step, f"no answer; first read: {e}")
        except OSError as e:
            ok(step, f"no answer; first read: {type(e).__name__}: {e}")


if __name__ == "__main__":
    sys.exit(main())
