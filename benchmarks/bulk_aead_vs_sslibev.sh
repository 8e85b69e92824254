#!/usr/bin/env bash
# Encrypted bulk data: mptun's user-space `aead` engine over MPTCP against shadowsocks-libev
# (aes-256-gcm, under mptcpize) in the same run, on the network-namespace test bed (3 uplinks,
# unshaped: the machine is the limit). Prints throughput and CPU seconds per GB of the two relay
# processes per case, and the issue-5 targets as ratios from this run:
#   aead/MPTCP >= 2x ss-libev's throughput, and <= 0.5x its CPU s/GB (both ends together).
# splice/MPTCP with `--bulk plain` runs too, as the unencrypted reference.
#
#   sudo benchmarks/bulk_aead_vs_sslibev.sh [extra `mptun bench` options, e.g. --runs 5]
#
# Installs shadowsocks-libev and mptcpd (for mptcpize) when missing. Needs root (namespaces);
# without root `mptun bench --mode auto` falls back to loopback and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) == 0 ]]; then
    need=()
    command -v ss-server >/dev/null || need+=(shadowsocks-libev)
    command -v mptcpize >/dev/null || need+=(mptcpd)
    if ((${#need[@]})); then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
    fi
fi
[[ -x .venv/bin/mptun ]] || make venv >/dev/null
out=${BENCH_OUT:-/tmp/mptun-bulk-bench}
mkdir -p "$out"
exec .venv/bin/mptun bench --mode auto --links raw \
    --cases splice-mptcp,aead-mptcp,ss-mptcp \
    --runs 3 --seconds 5 --idle-connections 0 --connrate-seconds 0 \
    --json "$out/bench.json" --chart "$out/bench.png" "$@"
