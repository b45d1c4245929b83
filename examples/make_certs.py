"""
Make a throw-away CA and two server certificates for examples/https.toml:

    python examples/make_certs.py [DIRECTORY]      # default: examples/certs

  certs/ca.pem                 the CA (trust it with curl --cacert)
  certs/shop.pem, shop.key     shop.example.test and www.shop.example.test (the default certificate)
  certs/api.pem, api.key       *.api.example.test

For trying HTTPS on a laptop only: never use these keys for anything real.
"""

import datetime
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def main(directory):
    os.makedirs(directory, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "twisted_slb example CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    write(os.path.join(directory, "ca.pem"), ca.public_bytes(serialization.Encoding.PEM))
    for base, names in (("shop", ["shop.example.test", "www.shop.example.test"]), ("api", ["*.api.example.test"])):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=90))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        write(os.path.join(directory, base + ".pem"), cert.public_bytes(serialization.Encoding.PEM))
        write(os.path.join(directory, base + ".key"), key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    print(f"certificates written to {directory}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "certs"))
