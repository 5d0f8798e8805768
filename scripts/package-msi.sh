#!/usr/bin/env bash
# Builds target/dist/sallyport-<version>-x86_64.msi: the Windows agent in a per-user MSI (no admin
# rights: %LOCALAPPDATA%\Programs\Sallyport, a Start-menu entry "Sallyport doctor", the HKCU Run
# value), made with wixl (Debian's msitools) from installer/windows/sallyport.wxs. Both the .exe
# and the .msi are Authenticode-signed with osslsigncode.
#
#   scripts/package-msi.sh [--profile dist|release|dev] [--exe PATH] [--out DIR]
#
# Signing key (never on the command line):
#   SIGN_PKCS12=company.pfx SIGN_PASSWORD_FILE=pass.txt   a real code-signing certificate, or
#   SIGN_CERT=cert.pem SIGN_KEY=key.pem                    PEM certificate (chain) and key;
#   neither: a throwaway self-signed test certificate is made in OUT/test-signing/ (its
#   certificate, test-signing/cert.pem, is what `osslsigncode verify -CAfile` needs).
# SIGN_TIMESTAMP_URL (e.g. http://timestamp.digicert.com) adds a timestamp when set.
# Needs wixl, osslsigncode, openssl. Prints the path of the .msi.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=dist
exe=""
out=target/dist
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --exe) exe="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "usage: $0 [--profile dist|release|dev] [--exe PATH] [--out DIR]" >&2; exit 64 ;;
  esac
done
for tool in wixl osslsigncode openssl; do
  command -v "$tool" >/dev/null 2>&1 || { echo "$0: \`$tool\` is required (apt-get install wixl osslsigncode openssl)" >&2; exit 1; }
done
if [ -z "$exe" ]; then
  cargo build --profile "$profile" --target x86_64-pc-windows-gnu -p sallyport >&2
  dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
  exe="${CARGO_TARGET_DIR:-target}/x86_64-pc-windows-gnu/$dir/sallyport.exe"
fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
mkdir -p "$out"
out=$(cd "$out" && pwd)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

# The signing key: given, or a test certificate made here.
sign_args=()
if [ -n "${SIGN_PKCS12:-}" ]; then
  sign_args=(-pkcs12 "$SIGN_PKCS12")
  [ -z "${SIGN_PASSWORD_FILE:-}" ] || sign_args+=(-readpass "$SIGN_PASSWORD_FILE")
elif [ -n "${SIGN_CERT:-}" ]; then
  sign_args=(-certs "$SIGN_CERT" -key "$SIGN_KEY")
else
  t="$out/test-signing"
  mkdir -p "$t"
  if [ ! -s "$t/cert.pem" ]; then
    openssl req -x509 -newkey rsa:3072 -nodes -days 30 -keyout "$t/key.pem" -out "$t/cert.pem" \
      -subj "/CN=Sallyport TEST code signing/O=Sallyport test" \
      -addext "keyUsage=critical,digitalSignature" -addext "extendedKeyUsage=codeSigning" \
      2>/dev/null
    chmod 600 "$t/key.pem"
  fi
  sign_args=(-certs "$t/cert.pem" -key "$t/key.pem")
  echo "signing with a TEST certificate ($t/cert.pem): not trusted by any Windows machine" >&2
fi
[ -z "${SIGN_TIMESTAMP_URL:-}" ] || sign_args+=(-ts "$SIGN_TIMESTAMP_URL")
sign() { # in out
  osslsigncode sign "${sign_args[@]}" -h sha256 -n "Sallyport agent" \
    -in "$1" -out "$2" >&2
}

sign "$exe" "$stage/sallyport.exe"
cp installer/windows/sallyport.wxs "$stage/"
msi="$out/sallyport-$version-x86_64.msi"
(cd "$stage" && wixl -a x64 -D "Version=$version" -o unsigned.msi sallyport.wxs) 2>&1 \
  | grep -v -e '^$' -e 'GLib-GObject-WARNING' >&2 || true
[ -s "$stage/unsigned.msi" ] || { echo "$0: wixl made no MSI" >&2; exit 1; }
rm -f "$msi"
sign "$stage/unsigned.msi" "$msi"
echo "$msi"
