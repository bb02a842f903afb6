"""TLS failures in words an operator can act on: was it the certificate chain or the name?"""

from __future__ import annotations

import ssl

#: OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
NAME_MISMATCH = (62, 64)
#: X509_V_ERR_CERT_NOT_YET_VALID and X509_V_ERR_CERT_HAS_EXPIRED.
NOT_VALID_NOW = (9, 10)


def describe_tls_error(exc: BaseException, host: str, ca_option: str = "tls.ca_file") -> str:
    """One sentence for a failed TLS handshake with ``host``: what failed, and what to do.

    A host name that the certificate does not hold is told apart from a chain
    that is not trusted (``ssl.SSLCertVerificationError.verify_code``), since
    the fixes differ.
    """
    verify = find_verify_error(exc)
    if verify is None:
        reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
        return f"TLS failed: {reason}"
    code = verify.verify_code
    message = (verify.verify_message or str(verify)).rstrip(".")
    if code in NAME_MISMATCH:
        return (
            f"TLS failed: the server's certificate is not for the host name {host} ({message}):"
            f" its chain is trusted, but it names another host. Connect by a name the"
            f" certificate holds, or give the server a certificate for {host}"
        )
    if code in NOT_VALID_NOW:
        return (
            f"TLS failed: the server's certificate is not valid now ({message}); renew it,"
            " or check this device's clock"
        )
    return (
        f"TLS failed: the server's certificate chain is not trusted ({message}); set"
        f" {ca_option} to the CA that signed it"
    )


def find_verify_error(exc: BaseException | None) -> ssl.SSLCertVerificationError | None:
    """The certificate verification error in ``exc``, its causes or its args, if any."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ssl.SSLCertVerificationError):
            return item
        todo += [item.__cause__, item.__context__, *item.args]
        todo += list(getattr(item, "exceptions", None) or ())
    return None
