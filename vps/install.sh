#!/usr/bin/env bash
# Install (or upgrade, or remove) the mptun server on a Debian/Ubuntu VPS, as root:
#
#   mptun/vps/install.sh                              # from the checkout this script is in
#   ./install.sh --from ./mptun                       # another source checkout
#   ./install.sh --from mptun-0.1.0-py3-none-any.whl  # a wheel (or an sdist, .tar.gz) `make dist` built
#   ./install.sh --uninstall [--purge]
#
# mptun itself never comes from a package index: no `mptun` is published on one, and a root
# installer that asked an index for that name would run whatever someone registered under it.
# Only its dependencies (cryptography, click) do.
#
# What it writes (and --uninstall removes): /opt/mptun/ (a virtual environment), /etc/mptun/
# (server.toml and the key; kept unless --purge), /etc/sysctl.d/90-mptun.conf,
# /etc/modules-load.d/mptun.conf (kTLS, where the kernel has it) and
# /etc/systemd/system/mptun-server.service. Re-running upgrades mptun and keeps the key and
# server.toml. See vps/README.md.
set -euo pipefail

PREFIX=/opt/mptun
VENV="$PREFIX/venv"
ETC=/etc/mptun
KEY="$ETC/key"
CONFIG="$ETC/server.toml"
SYSCTL=/etc/sysctl.d/90-mptun.conf
MODULES=/etc/modules-load.d/mptun.conf
UNIT_NAME=mptun-server.service
UNIT="/etc/systemd/system/$UNIT_NAME"
MIN_PYTHON=3.11
# ~6 descriptors per relayed connection (client and target sockets, a splice pipe pair per
# direction), plus headroom for the listener, logging and Python itself.
FDS_PER_CONNECTION=6

SOURCE=""
INDEX_URL=""
PYTHON=python3
LISTEN="[::]:8443"
PUBLIC_HOST=""
MAX_CONNECTIONS=4096
START=1
ACTION=install
PURGE=0

usage() {
	cat <<EOF
usage: $0 [options]

Installs the mptun server into $VENV, runs it as the systemd service $UNIT_NAME.

  --from PATH          a source checkout, or a wheel or sdist file (mptun-*.whl, mptun-*.tar.gz);
                       default: the checkout this script is in. Never a package index.
  --index-url URL      package index for the dependencies (default: pip's configuration)
  --python PY          Python $MIN_PYTHON or newer to build the environment with (default: python3)
  --listen ADDR:PORT   where the server accepts tunnels (default: $LISTEN, both families)
  --public-host HOST   the address routers use to reach this VPS (printed at the end)
  --max-connections N  concurrent tunnel connections (default: $MAX_CONNECTIONS; sizes LimitNOFILE)
  --no-start           install but do not enable or start the service
  --uninstall          remove what the installer added, except $ETC (the key and config)
  --purge              with --uninstall: remove $ETC too (the key is gone for good)
  -h, --help           this text
EOF
}

die() {
	echo "install.sh: error: $*" >&2
	exit 1
}

say() {
	echo "install.sh: $*"
}

parse_args() {
	while [ $# -gt 0 ]; do
		case "$1" in
		--from) SOURCE=${2:?--from needs a path}; shift ;;
		--version) die "--version is gone: mptun is never fetched from a package index; give --from a checkout or a file \`make dist\` built" ;;
		--index-url) INDEX_URL=${2:?--index-url needs a URL}; shift ;;
		--python) PYTHON=${2:?--python needs an interpreter}; shift ;;
		--listen) LISTEN=${2:?--listen needs ADDR:PORT}; shift ;;
		--public-host) PUBLIC_HOST=${2:?--public-host needs a host}; shift ;;
		--max-connections) MAX_CONNECTIONS=${2:?--max-connections needs a number}; shift ;;
		--no-start) START=0 ;;
		--uninstall) ACTION=uninstall ;;
		--purge) PURGE=1 ;;
		-h | --help) usage; exit 0 ;;
		*) usage >&2; die "unknown argument: $1" ;;
		esac
		shift
	done
	case "$MAX_CONNECTIONS" in
	'' | *[!0-9]*) die "--max-connections: not a number: $MAX_CONNECTIONS" ;;
	esac
	[ "$MAX_CONNECTIONS" -ge 1 ] || die "--max-connections must be at least 1"
	[ "$PURGE" = 0 ] || [ "$ACTION" = uninstall ] || die "--purge goes with --uninstall"
	if [ -z "$SOURCE" ]; then
		SOURCE=$(dirname "$(realpath "$0")")/..
		is_checkout "$SOURCE" ||
			die "$SOURCE is not an mptun checkout: give --from a checkout or a wheel/sdist file"
	fi
	[ -e "$SOURCE" ] || die "--from $SOURCE: no such file or directory"
	SOURCE=$(realpath "$SOURCE")
	if [ -d "$SOURCE" ]; then
		is_checkout "$SOURCE" || die "--from $SOURCE: not an mptun checkout (no pyproject.toml naming mptun)"
	else
		case "${SOURCE##*/}" in
		mptun-*.whl | mptun-*.tar.gz) ;;
		*) die "--from $SOURCE: not an mptun wheel or sdist (mptun-*.whl, mptun-*.tar.gz)" ;;
		esac
	fi
}

# A directory holding mptun's own sources: what pip builds from, with no index lookup of mptun.
is_checkout() {
	[ -f "$1/pyproject.toml" ] && grep -q '^name = "mptun"$' "$1/pyproject.toml"
}

have_systemd() {
	[ -d /run/systemd/system ]
}

# A fresh Debian has python3 without the venv module (package python3-venv); iproute2 gives
# `ip mptcp`. Install only what is missing.
ensure_packages() {
	local missing=()
	command -v "$PYTHON" >/dev/null 2>&1 || missing+=(python3)
	if command -v "$PYTHON" >/dev/null 2>&1 && ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
		missing+=(python3-venv)
	fi
	command -v ip >/dev/null 2>&1 || missing+=(iproute2)
	if [ ${#missing[@]} -gt 0 ]; then
		command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
		say "installing ${missing[*]}"
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	fi
	"$PYTHON" -c "import sys; sys.exit(sys.version_info < tuple(map(int, '$MIN_PYTHON'.split('.'))))" ||
		die "mptun needs Python $MIN_PYTHON or newer; $("$PYTHON" -V 2>&1) found (give one with --python)"
}

# Upgrade by building a fresh environment at the final path (a venv records its own path, so it
# cannot be built elsewhere and moved) with the old one set aside, and put the old one back if the
# new one fails: a failed upgrade leaves the previous install in place.
install_venv() {
	local spec what pip_args=(--quiet --disable-pip-version-check)
	[ -z "$INDEX_URL" ] || pip_args+=(--index-url "$INDEX_URL")
	# A path, never a name: pip installs this very file or tree (dependencies from the index).
	spec="$SOURCE"
	if [ -d "$SOURCE" ]; then what="the checkout $SOURCE"; else what="the file $SOURCE"; fi
	install -d -m 0755 "$PREFIX"
	rm -rf "$VENV.old"
	[ ! -e "$VENV" ] || mv "$VENV" "$VENV.old"
	say "installing mptun from $what into $VENV (not from a package index; only its dependencies are)"
	if ! { "$PYTHON" -m venv "$VENV" &&
		"$VENV/bin/python" -m pip install "${pip_args[@]}" "$spec" &&
		"$VENV/bin/mptun" --version >/dev/null; }; then
		rm -rf "$VENV"
		[ ! -e "$VENV.old" ] || mv "$VENV.old" "$VENV"
		die "installing $spec failed; the previous install (if any) is back in place"
	fi
	rm -rf "$VENV.old"
}

install_key() {
	install -d -m 0755 "$ETC"
	if [ -s "$KEY" ]; then
		say "keeping the existing key $KEY"
	else
		(umask 077 && "$VENV/bin/mptun" genkey -o "$KEY" 2>/dev/null)
		say "created a new key $KEY"
	fi
	chown root:root "$KEY"
	chmod 0600 "$KEY"
}

install_config() {
	if [ -e "$CONFIG" ]; then
		say "keeping the existing $CONFIG"
		return
	fi
	cat >"$CONFIG" <<EOF
# mptun server configuration, written by vps/install.sh (re-running it keeps this file).
# Keys are the long options of \`mptun server --help\`. The key itself is not here: systemd
# hands $KEY to the service (LoadCredential), see $UNIT.
[server]
listen = "$LISTEN"
max-connections = $MAX_CONNECTIONS
EOF
	chmod 0644 "$CONFIG"
	"$VENV/bin/mptun" server --config "$CONFIG" --help >/dev/null ||
		die "$CONFIG does not parse"
}

install_sysctl() {
	# the values and their reasons: vps/90-mptun.conf, next to this script
	install -m 0644 "$(dirname "$(realpath "$0")")/90-mptun.conf" "$SYSCTL"
	if ! sysctl -q -p "$SYSCTL" >/dev/null; then
		say "warning: could not apply $SYSCTL now (it applies at boot)"
	fi
}

# kTLS: the server seals encrypted bulk data in the kernel where the tunnel socket takes it (TCP
# tunnels; MPTCP sockets refuse it). The kernel loads the `tls` module on demand only for a caller
# with CAP_NET_ADMIN (net/ipv4/tcp_ulp.c, __tcp_ulp_find_autoload), which the service has not, so
# it is loaded at boot (modules-load.d) and now.
install_modules() {
	if ! modinfo tls >/dev/null 2>&1; then
		rm -f "$MODULES"
		say "this kernel has no tls module: encrypted bulk data is sealed in user space"
		return
	fi
	printf '# mptun server: kTLS (written by vps/install.sh, removed by --uninstall)\ntls\n' >"$MODULES"
	chmod 0644 "$MODULES"
	modprobe tls 2>/dev/null || say "warning: could not load the tls module now (it loads at boot)"
}

install_unit() {
	local ip nofile
	ip=$(command -v ip)
	nofile=$((MAX_CONNECTIONS * FDS_PER_CONNECTION + 1024))
	cat >"$UNIT" <<EOF
# mptun server: written by vps/install.sh, removed by \`install.sh --uninstall\`.
[Unit]
Description=mptun server (multipath TCP tunnel, VPS end)
Documentation=man:systemd.exec(5)
After=network-online.target
Wants=network-online.target

[Service]
Type=exec
# MPTCP limits live in the network namespace, not in sysctl: accept up to 8 extra subflows per
# connection (one per router uplink) and 8 announced addresses. "+" runs it with privileges.
ExecStartPre=+$ip mptcp limits set subflows 8 add_addr_accepted 8
ExecStart=$VENV/bin/mptun server --config $CONFIG --key-file \${CREDENTIALS_DIRECTORY}/key
# SIGHUP re-reads server.toml, keeping open connections (a new key needs a restart: systemd
# copies the credential only at start).
ExecReload=/bin/kill -HUP \$MAINPID
Restart=on-failure
RestartSec=2s
# The key stays root-only in $ETC; systemd gives the service a private copy.
LoadCredential=key:$KEY
# A transient unprivileged user; only the capability to bind ports below 1024 (e.g. 443).
DynamicUser=yes
CapabilityBoundingSet=CAP_NET_BIND_SERVICE
AmbientCapabilities=CAP_NET_BIND_SERVICE
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
ProcSubset=pid
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
UMask=0077
# ~$FDS_PER_CONNECTION descriptors per connection for max-connections $MAX_CONNECTIONS, plus headroom.
LimitNOFILE=$nofile

[Install]
WantedBy=multi-user.target
EOF
	chmod 0644 "$UNIT"
}

start_service() {
	if [ "$START" = 0 ]; then
		say "not starting (--no-start): systemctl enable --now $UNIT_NAME"
		return
	fi
	if ! have_systemd; then
		say "systemd is not running here: start the server with the unit's ExecStart line"
		return
	fi
	systemctl daemon-reload
	systemctl enable "$UNIT_NAME" >/dev/null 2>&1
	systemctl restart "$UNIT_NAME"
	sleep 1
	systemctl is-active --quiet "$UNIT_NAME" ||
		die "$UNIT_NAME did not start: journalctl -u $UNIT_NAME"
}

# The address routers use: --public-host, else the address of the default route's interface.
public_host() {
	local dev addr
	if [ -n "$PUBLIC_HOST" ]; then
		echo "$PUBLIC_HOST"
		return
	fi
	dev=$(ip -o route show default 2>/dev/null | awk '{for (i = 1; i < NF; i++) if ($i == "dev") { print $(i + 1); exit }}')
	if [ -n "$dev" ]; then
		addr=$(ip -o -4 addr show dev "$dev" scope global 2>/dev/null | awk '{ sub("/.*", "", $4); print $4; exit }')
	fi
	echo "${addr:-YOUR-VPS-ADDRESS}"
}

# The IPv6 address routers may use: the first global, non-temporary address of the IPv6 default
# route's interface; nothing when there is none or the server listens on IPv4 only.
public_host6() {
	local dev
	case "$LISTEN" in
	\[::\]:* | \[*:*\]:*) ;;
	*) return 0 ;;
	esac
	case "$PUBLIC_HOST" in *:*) return 0 ;; esac # --public-host is IPv6 already
	dev=$(ip -o -6 route show default 2>/dev/null | awk '{for (i = 1; i < NF; i++) if ($i == "dev") { print $(i + 1); exit }}')
	[ -n "$dev" ] || return 0
	ip -o -6 addr show dev "$dev" scope global -temporary -deprecated 2>/dev/null |
		awk '{ sub("/.*", "", $4); print $4; exit }'
}

# The IPv6 lines of the router settings: another server address, and the firewall exemptions.
print_ipv6_settings() {
	local host6
	host6=$(public_host6)
	if [ -z "$host6" ]; then
		echo
		echo "IPv6: none (no IPv6 default route here, or the server listens on IPv4 only)."
		return
	fi
	cat <<EOF

IPv6: this VPS also answers at [$host6]:$1. A router whose uplinks all have IPv6 may use

		option server '[$host6]:$1'

and in gateway mode both addresses are exempt from the redirect (config nft):

		list server '$(public_host)'
		list server '$host6'
EOF
}

print_router_settings() {
	local port host server version
	port=${LISTEN##*:}
	host=$(public_host)
	case "$host" in
	*:*) server="[$host]:$port" ;;
	*) server="$host:$port" ;;
	esac
	version=$("$VENV/bin/mptun" --version)
	cat <<EOF

$version installed: $VENV, config $CONFIG, service $UNIT_NAME.

Router side (OpenWrt, /etc/config/mptun):

	config client 'main'
		option enabled '1'
		option server '$server'
		option key_file '/etc/mptun/key'

and the key, into /etc/mptun/key on the router (keep it secret):

	umask 077; mkdir -p /etc/mptun; echo '$(cat "$KEY")' > /etc/mptun/key
$(print_ipv6_settings "$port")

Open TCP port $port in the VPS provider's firewall. Any other client: mptun client --server $server --key-file KEYFILE
EOF
}

uninstall() {
	if have_systemd && [ -e "$UNIT" ]; then
		systemctl disable --now "$UNIT_NAME" >/dev/null 2>&1 || true
	fi
	rm -f "$UNIT" "$SYSCTL" "$MODULES"
	have_systemd && systemctl daemon-reload
	rm -rf "$PREFIX"
	if [ "$PURGE" = 1 ]; then
		rm -rf "$ETC"
		say "removed mptun, its unit, sysctl drop-in and $ETC (key included)"
	else
		say "removed mptun, its unit and sysctl drop-in; kept $ETC (the key; --purge removes it)"
	fi
	say "sysctl values already applied stay until reboot"
}

main() {
	parse_args "$@"
	[ "$(id -u)" = 0 ] || die "run as root"
	if [ "$ACTION" = uninstall ]; then
		uninstall
		return
	fi
	umask 022
	ensure_packages
	install_venv
	install_key
	install_config
	install_sysctl
	install_modules
	install_unit
	start_service
	print_router_settings
}

main "$@"
