#!/bin/sh
# cvm-warden's FLARE site launcher: `launch.sh server|client SITE PYTHON`.
#
# The measured, read-only bundle holds the site's startup kit under kit/ (signed by the
# project's root CA; its private key is not in it: the broker releases it into
# /run/cvm-warden/secrets/, where fed_*.json's "ssl_private_key" points). FLARE needs a
# writable workspace whose startup/ and local/ are real folders (it finds fed_*.json with
# os.walk, which does not follow symlinks), so they are copied into one on the tmpfs, then
# FLARE replaces this shell: one foreground process, supervised by cvm-warden.
set -eu
role=$1 site=$2 python=$3
kit=$(dirname "$0")/kit
ws=/tmp/flare-workspace
mkdir -p "$ws"
cp -R "$kit/startup" "$kit/local" "$ws/"
case $role in
server) exec "$python" -u -m nvflare.private.fed.app.server.server_train -m "$ws" \
    -s fed_server.json --set secure_train=true org=nvidia config_folder=config ;;
client) exec "$python" -u -m nvflare.private.fed.app.client.client_train -m "$ws" \
    -s fed_client.json --set secure_train=true "uid=$site" org=nvidia config_folder=config ;;
*) echo "launch.sh: role must be server or client, not $role" >&2; exit 2 ;;
esac
