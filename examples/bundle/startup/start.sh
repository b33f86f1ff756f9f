#!/bin/sh
# Example workload: stands in for an NVIDIA FLARE client's startup script. It reports the
# identity and restrictions it was started with, "trains" for a few rounds (a pause of $2
# seconds after each) and exits.
set -eu
echo "workload: hello from the federated-learning participant"
echo "workload: uid=$(id -u) gid=$(id -g) groups=$(id -G)"
grep -E '^(CapEff|CapBnd|CapAmb|NoNewPrivs)' /proc/self/status | sed 's/^/workload: /'
echo "workload: environment: $(env | sort | tr '\n' ' ')"
echo "workload: umask $(umask), working directory $(pwd)"
key=${FL_CLIENT_KEY:-}
if [ -n "$key" ] && [ -r "$key" ]; then
    echo "workload: TLS key $key: $(wc -c < "$key") bytes, mode $(stat -c %a "$key"), owner $(stat -c %U "$key")"
else
    echo "workload: TLS key missing" >&2
    exit 3
fi
rounds=${1:-3}
pause=${2:-0}
i=1
while [ "$i" -le "$rounds" ]; do
    echo "workload: round $i/$rounds: $(wc -c < "$(dirname "$0")/../model/weights.txt") bytes of weights"
    if [ "$pause" != 0 ]; then
        sleep "$pause"
    fi
    i=$((i + 1))
done
echo "workload: done"
