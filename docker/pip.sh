#!/usr/bin/env bash
# pip for image builds: `pip.sh ARGS...` runs `$PYTHON -m pip ARGS...`.
# If the build was given the BuildKit secret `ca_bundle` (extra CA certificates, PEM), pip trusts them
# for this one command: they are joined with the usual CA bundle in a temporary file that is deleted
# before the RUN step ends, so neither the secret nor the joined bundle ends up in a layer.
# If pip fails on certificate verification, say how to pass the secret.
set -euo pipefail
python=${PYTHON:-/opt/venv/bin/python}
secret=/run/secrets/ca_bundle
work=$(mktemp -d)
trap 'rm -rf -- "$work"' EXIT

if [[ -s $secret ]]; then
    bundle=$work/ca.pem
    : > "$bundle"
    pip_certifi=$("$python" -c 'from pip._vendor import certifi; print(certifi.where())' 2>/dev/null || true)
    for f in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt "$pip_certifi"; do
        if [[ -n $f && -f $f ]]; then cat -- "$f" >> "$bundle"; printf '\n' >> "$bundle"; fi
    done
    cat -- "$secret" >> "$bundle"
    export PIP_CERT=$bundle SSL_CERT_FILE=$bundle REQUESTS_CA_BUNDLE=$bundle
    echo "pip.sh: trusting the extra CA certificates of the build secret ca_bundle for this step"
fi

set +e
"$python" -m pip "$@" 2>&1 | tee "$work/pip.log"
status=${PIPESTATUS[0]}
set -e
if (( status != 0 )) && grep -qiE 'CERTIFICATE_VERIFY_FAILED|certificate verify failed|SSLCertVerificationError' "$work/pip.log"; then
    cat >&2 <<'MSG'

=====================================================================================================
pip could not verify the package index's TLS certificate. Behind a TLS-intercepting (corporate)
proxy, hand the proxy's CA certificate(s) to the build as a BuildKit secret, e.g.

    DOCKER_BUILDKIT=1 docker build --secret id=ca_bundle,src=/path/to/ca.pem -t rct-dist .

(/path/to/ca.pem: one PEM file holding the extra certificates). The secret is used by pip during the
build only; it is not stored in the image.
=====================================================================================================
MSG
fi
exit "$status"
