#!/bin/sh
# cvm-warden's FLARE site launcher: `launch.sh server|client SITE PYTHON`.
#
# The measured, read-only bundle holds the site's startup kit under kit/, signed by the
# project's root CA, without its private key: the broker releases the key into
# /run/cvm-warden/secrets/ after attestation. FLARE needs a writable workspace whose startup/
# and local/ are real folders (it finds fed_*.json with os.walk, which does not follow
# symlinks), so they are copied into one on the tmpfs with the released key beside the kit's
# files — FLARE's own secure_train check then verifies that key against the project's
# signature — and FLARE replaces this shell: one foreground process, supervised by cvm-warden.
set -eu
role=$1 site=$2 python=$3
kit=$(dirname "$0")/kit
ws=/tmp/flare-workspace
mkdir -p "$ws"
cp -R "$kit/startup" "$kit/local" "$ws/"
chmod -R u+w "$ws"
case $role in
server) key=server.key ;;
*) key=client.key ;;
esac
secrets=${CVM_WARDEN_SECRETS:-/run/cvm-warden/secrets}
if [ -e "$secrets/$key" ]; then
    cp "$secrets/$key" "$ws/startup/$key"
fi
case $role in
server) exec "$python" -u -m nvflare.private.fed.app.server.server_train -m "$ws" \
    -s fed_server.json --set secure_train=true org=nvidia config_folder=config ;;
client) exec "$python" -u -m nvflare.private.fed.app.client.client_train -m "$ws" \
    -s fed_client.json --set secure_train=true "uid=$site" org=nvidia config_folder=config ;;
*) echo "launch.sh: role must be server or client, not $role" >&2; exit 2 ;;
esac
