#!/bin/sh
# shellcheck shell=ash
# /usr/share/mptun/mptun.sh: the shell half of the mptun service, sourced by /etc/init.d/mptun and
# /etc/hotplug.d/iface/90-mptun. It reads /etc/config/mptun with OpenWrt's config_load/config_get
# and changes the kernel with ip-full, so no Python runs for it: on a router a Python start costs
# seconds of CPU, and netifd runs the hotplug hook on every interface event.
#
# Uplinks (what `mptun uplinks IFACE` does, client/uplinks.py, kept to netifd's view of the
# interface): per `config uplink`, routing table table_base+N (N its position) with the uplink's
# default route; per address, rule P `from ADDR lookup main suppress_prefixlength 0` and rule P+1
# `from ADDR lookup TABLE` (P = rule_priority); an MPTCP `subflow` endpoint. Rules and routes carry
# protocol 247 and endpoints ids 192-255, as client/uplinks.py marks them, so both find them.
#
# Uplink health (client/health.py): the client probes each uplink and runs this file as a program,
# `mptun.sh uplink-state DEVICE STATE` (its --uplink-hook), at each change. Dead or mptcp-broken:
# the uplink's endpoints are withdrawn (its table and rules stay) and a marker file,
# /var/run/mptun/withdrawn.IFACE, keeps the hotplug hook from adding them again; up or degraded:
# the marker goes and the endpoints come back. This file is the one owner of the endpoints.

MPTUN_PROTO=247
MPTUN_ID_LO=192
MPTUN_ID_HI=255
# tproxy (config nft, mode tproxy): client/nftables.py's defaults, overridable as in `mptun nft`.
MPTUN_TPROXY_MARK=0x10000
MPTUN_TPROXY_TABLE=100
MPTUN_RUNDIR="$MPTUN_ROOT/var/run/mptun"

mptun_log() {
	logger -t mptun -p "daemon.$1" "$2" 2>/dev/null
	[ -n "$MPTUN_VERBOSE" ] && echo "mptun: $2" >&2
	return 0
}

# mptun_uplink_index IFACE: print the position (0...) of the enabled `config uplink` naming IFACE.
mptun_uplink_index() {
	_mptun_want=$1
	_mptun_n=0
	_mptun_found=
	config_foreach _mptun_uplink_match uplink
	[ -n "$_mptun_found" ] && echo "$_mptun_found"
}

_mptun_uplink_match() {
	local iface enabled
	config_get iface "$1" interface
	config_get_bool enabled "$1" enabled 1
	[ "$enabled" = 1 ] || return 0
	[ -z "$_mptun_found" ] && [ "$iface" = "$_mptun_want" ] && _mptun_found=$_mptun_n
	_mptun_n=$((_mptun_n + 1))
}

# mptun_uplink_interfaces: the enabled uplinks' interface names, one per line.
mptun_uplink_interfaces() {
	config_foreach _mptun_uplink_print uplink
}

_mptun_uplink_print() {
	local iface enabled
	config_get iface "$1" interface
	config_get_bool enabled "$1" enabled 1
	[ "$enabled" = 1 ] && [ -n "$iface" ] && echo "$iface"
}

# mptun_client_section: the first enabled `config client` section's name (empty: none).
mptun_client_section() {
	_mptun_client=
	config_foreach _mptun_client_match client
	echo "$_mptun_client"
}

_mptun_client_match() {
	local enabled disabled
	config_get_bool enabled "$1" enabled 1
	config_get_bool disabled "$1" disabled 0
	[ -z "$_mptun_client" ] && [ "$enabled" = 1 ] && [ "$disabled" = 0 ] && _mptun_client=$1
}

_mptun_uplinks_settings() {
	local sec=uplinks
	config_get MPTUN_TABLE_BASE "$sec" table_base 1500
	config_get MPTUN_RULE_PRIORITY "$sec" rule_priority 1500
	config_get MPTUN_SUBFLOWS "$sec" subflows 8
	config_get MPTUN_BACKUP "$sec" backup ""
}

# _mptun_free_id: the highest endpoint id in 192-255 not in use.
_mptun_free_id() {
	local used id=$MPTUN_ID_HI
	used=" $(ip mptcp endpoint show 2>/dev/null | sed -n 's/.* id \([0-9]*\).*/\1/p' | tr '\n' ' ') "
	while [ "$id" -ge "$MPTUN_ID_LO" ]; do
		case "$used" in *" $id "*) ;; *) echo "$id" && return 0 ;; esac
		id=$((id - 1))
	done
	return 1
}

# _mptun_table_addrs TABLE PREF: the source addresses mptun's rules send to TABLE.
_mptun_table_addrs() {
	local fam
	for fam in -4 -6; do
		ip "$fam" rule show pref $(($2 + 1)) 2>/dev/null |
			awk -v t="$1" '$2 == "from" && $4 == "lookup" && $5 == t { print $3 }'
	done
}

# _mptun_dev_endpoints_delete DEVICE: remove mptun's endpoints (ids 192-255) on DEVICE.
_mptun_dev_endpoints_delete() {
	local id
	for id in $(ip mptcp endpoint show | sed -n "s/.* id \([0-9]*\) .*dev $1\( .*\)\{0,1\}\$/\1/p"); do
		[ "$id" -ge "$MPTUN_ID_LO" ] && ip mptcp endpoint delete id "$id"
	done
	return 0
}

# mptun_withdrawn IFACE: whether uplink health withdrew the uplink's endpoints (its marker).
mptun_withdrawn() {
	[ -e "$MPTUN_RUNDIR/withdrawn.$1" ]
}

# _mptun_addr_down ADDR PREF: remove the address's two rules and its mptun endpoint.
_mptun_addr_down() {
	local fam=-4 id
	case "$1" in *:*) fam=-6 ;; esac
	ip "$fam" rule del pref "$2" from "$1" 2>/dev/null
	ip "$fam" rule del pref $(($2 + 1)) from "$1" 2>/dev/null
	for id in $(ip mptcp endpoint show | sed -n "s/^$1 id \([0-9]*\) .*/\1/p"); do
		[ "$id" -ge "$MPTUN_ID_LO" ] && ip mptcp endpoint delete id "$id"
	done
	return 0
}

# mptun_uplink_up IFACE: give the uplink its table, rules and endpoints (idempotent).
mptun_uplink_up() {
	local iface=$1 idx dev table pref addrs addrs6 gw gw6 addr fam id flags
	idx=$(mptun_uplink_index "$iface") || return 0
	_mptun_uplinks_settings
	network_get_device dev "$iface" || network_get_physdev dev "$iface" || {
		mptun_log warning "uplink $iface: no device"
		return 1
	}
	table=$((MPTUN_TABLE_BASE + idx))
	pref=$MPTUN_RULE_PRIORITY
	network_get_ipaddrs addrs "$iface"
	network_get_ipaddrs6 addrs6 "$iface"
	network_get_gateway gw "$iface"
	network_get_gateway6 gw6 "$iface"
	# an address the uplink no longer has (ifupdate after a new DHCP lease): its rules go
	for addr in $(_mptun_table_addrs "$table" "$pref"); do
		case " $addrs $addrs6 " in *" $addr "*) ;; *) _mptun_addr_down "$addr" "$pref" ;; esac
	done
	if [ -n "$addrs" ]; then
		ip -4 route replace default ${gw:+via "$gw"} dev "$dev" table "$table" proto "$MPTUN_PROTO"
	fi
	if [ -n "$addrs6" ]; then
		ip -6 route replace default ${gw6:+via "$gw6"} dev "$dev" table "$table" \
			proto "$MPTUN_PROTO"
	fi
	flags=subflow
	case " $MPTUN_BACKUP " in *" $dev "* | *" $iface "*) flags="subflow backup" ;; esac
	for addr in $addrs $addrs6; do
		case "$addr" in *:*) fam=-6 ;; *) fam=-4 ;; esac
		ip "$fam" rule del pref "$pref" from "$addr" 2>/dev/null
		ip "$fam" rule del pref $((pref + 1)) from "$addr" 2>/dev/null
		ip "$fam" rule add pref "$pref" from "$addr" lookup main suppress_prefixlength 0 \
			proto "$MPTUN_PROTO"
		ip "$fam" rule add pref $((pref + 1)) from "$addr" lookup "$table" proto "$MPTUN_PROTO"
		# withdrawn by uplink health (dead): the endpoint waits for `uplink-state ... up`
		mptun_withdrawn "$iface" && continue
		ip mptcp endpoint show | grep -q "^$addr " && continue
		id=$(_mptun_free_id) || {
			mptun_log err "uplink $iface: no free MPTCP endpoint id in $MPTUN_ID_LO-$MPTUN_ID_HI"
			return 1
		}
		# shellcheck disable=SC2086  # "subflow" or "subflow backup"
		ip mptcp endpoint add "$addr" dev "$dev" id "$id" $flags
	done
	ip mptcp limits set subflow "$MPTUN_SUBFLOWS" add_addr_accepted "$MPTUN_SUBFLOWS" 2>/dev/null
	mptun_log info "uplink $iface ($dev): table $table, ${addrs:+$addrs }${addrs6:-}$(
		mptun_withdrawn "$iface" && echo " (endpoints withdrawn: dead by the health checks)")"
	return 0
}

# mptun_uplink_down IFACE [DEVICE]: remove what mptun_uplink_up added for the uplink. The
# addresses may already be gone (ifdown): rules are found by their table, endpoints by device.
mptun_uplink_down() {
	local iface=$1 dev=$2 idx table pref fam addr id
	idx=$(mptun_uplink_index "$iface") || return 0
	_mptun_uplinks_settings
	[ -n "$dev" ] || network_get_device dev "$iface" || network_get_physdev dev "$iface"
	table=$((MPTUN_TABLE_BASE + idx))
	pref=$MPTUN_RULE_PRIORITY
	for addr in $(_mptun_table_addrs "$table" "$pref"); do
		_mptun_addr_down "$addr" "$pref"
	done
	for fam in -4 -6; do
		ip "$fam" route flush table "$table" proto "$MPTUN_PROTO" 2>/dev/null
	done
	[ -n "$dev" ] || return 0
	_mptun_dev_endpoints_delete "$dev"
}

# mptun_uplink_device IFACE: print the uplink's kernel device, as netifd names it (the one
# `mptun client --uplink` probes through and names in uplink-state).
mptun_uplink_device() {
	local dev=
	network_get_device dev "$1" || network_get_physdev dev "$1" || return 1
	echo "$dev"
}

# mptun_uplink_of DEVICE: print the enabled uplink (interface) whose device is DEVICE.
mptun_uplink_of() {
	local iface
	for iface in $(mptun_uplink_interfaces); do
		[ "$(mptun_uplink_device "$iface")" = "$1" ] && echo "$iface" && return 0
	done
	return 1
}

# mptun_uplink_state DEVICE STATE: what the client's uplink health found (its --uplink-hook).
# dead, mptcp-broken: withdraw the uplink's endpoints (no new subflows over it; its table and
# rules stay, and the subflows it has end as the kernel closes those of a removed endpoint) and
# leave the marker; up, degraded: remove the marker and add them again.
mptun_uplink_state() {
	local dev=$1 state=$2 iface
	case "$state" in
	up | degraded | dead | mptcp-broken) ;;
	*)
		mptun_log err "uplink-state $dev: unknown state '$state' (up, degraded, dead, mptcp-broken)"
		return 2
		;;
	esac
	# only while the service runs (stop_service removes the file first)
	[ -e "$MPTUN_RUNDIR/started" ] || return 0
	iface=$(mptun_uplink_of "$dev") || {
		mptun_log warning "uplink-state: $dev is no enabled uplink's device"
		return 0
	}
	case "$state" in
	dead | mptcp-broken)
		mptun_withdrawn "$iface" && return 0
		touch "$MPTUN_RUNDIR/withdrawn.$iface"
		_mptun_dev_endpoints_delete "$dev"
		mptun_log notice "uplink $iface ($dev) is $state: its MPTCP endpoints withdrawn"
		;;
	*)
		mptun_withdrawn "$iface" || return 0
		rm -f "$MPTUN_RUNDIR/withdrawn.$iface"
		network_is_up "$iface" && mptun_uplink_up "$iface"
		mptun_log notice "uplink $iface ($dev) is $state: its MPTCP endpoints are back"
		;;
	esac
	return 0
}

# mptun_blackhole_off: net.mptcp.blackhole_timeout 0 where the kernel has it (6.12+). After a
# suspected firewall blackhole the kernel turns MPTCP off for new outgoing connections of the
# namespace for blackhole_timeout seconds (default 3600; Documentation/networking/
# mptcp-sysctl.rst); on a router with several uplinks that trips when a blackholed uplink
# recovers and would leave the tunnel on one path for an hour. Uplink health handles a dead
# uplink instead (`mptun uplinks` does the same, client/netlink.py).
mptun_blackhole_off() {
	local f=/proc/sys/net/mptcp/blackhole_timeout
	[ -e "$f" ] || return 0
	[ "$(cat "$f")" = 0 ] || echo 0 >"$f" 2>/dev/null ||
		mptun_log warning "cannot set net.mptcp.blackhole_timeout to 0"
	return 0
}

# mptun_uplinks_all up|down: every enabled uplink that netifd reports up (down: every uplink).
mptun_uplinks_all() {
	local iface
	for iface in $(mptun_uplink_interfaces); do
		if [ "$1" = up ]; then
			network_is_up "$iface" && mptun_uplink_up "$iface"
		else
			mptun_uplink_down "$iface"
		fi
	done
	return 0
}

# mptun_tproxy up|down: the policy routing that delivers tproxy-marked packets to this host
# (what `mptun nft --mode tproxy` prints as comments), for IPv4 and IPv6; TCP and UDP alike.
mptun_tproxy() {
	local mark table fam dst
	config_get mark nft mark "$MPTUN_TPROXY_MARK"
	config_get table nft route_table "$MPTUN_TPROXY_TABLE"
	for fam in -4 -6; do
		dst=0.0.0.0/0
		[ "$fam" = -6 ] && dst=::/0
		while ip "$fam" rule del fwmark "$mark" lookup "$table" 2>/dev/null; do :; done
		ip "$fam" route flush table "$table" proto "$MPTUN_PROTO" 2>/dev/null
		[ "$1" = up ] || continue
		ip "$fam" rule add fwmark "$mark" lookup "$table" proto "$MPTUN_PROTO"
		ip "$fam" route replace local "$dst" dev lo table "$table" proto "$MPTUN_PROTO"
	done
	return 0
}

# mptun_dnsmasq_conf_dirs: the conf-dir of every dnsmasq instance (OpenWrt's dnsmasq init writes
# conf-dir= into /var/etc/dnsmasq.conf.<section>; /tmp/dnsmasq.d when none is found).
mptun_dnsmasq_conf_dirs() {
	local dirs
	dirs=$(sed -n 's/^conf-dir=\([^,]*\).*/\1/p' "$MPTUN_ROOT"/var/etc/dnsmasq.conf.* 2>/dev/null)
	echo "${dirs:-$MPTUN_ROOT/tmp/dnsmasq.d}"
}

# mptun_key_files KEY_FILE SERVER...: the key files the client will read, one per line: KEY_FILE
# (when set) and the PATH of each SERVER given as HOST:PORT,key-file=PATH (or key_file=PATH).
mptun_key_files() {
	local s
	[ -n "$1" ] && echo "$1"
	shift
	for s in "$@"; do
		case "$s" in
		*,key-file=* | *,key_file=*) echo "${s#*,key?file=}" ;;
		esac
	done
}

# _mptun_wan_nameservers: the uplinks' DNS servers, as netifd writes them for dnsmasq.
_mptun_wan_nameservers() {
	sed -n 's/^nameserver[[:space:]]*\([^[:space:]]*\).*/\1/p' \
		"$MPTUN_ROOT/tmp/resolv.conf.d/resolv.conf.auto" "$MPTUN_ROOT/tmp/resolv.conf.auto" \
		2>/dev/null | sort -u
}

# _mptun_server_names SERVER...: the host names (not addresses) among HOST:PORT / [V6]:PORT
# (each possibly followed by ,key-file=PATH).
_mptun_server_names() {
	local s host
	for s in "$@"; do
		s=${s%%,*}
		case "$s" in
		\[*) continue ;; # an IPv6 literal
		esac
		host=${s%:*}
		case "$host" in
		*[!0-9.]*) echo "$host" ;;
		esac
	done
}

# mptun_dnsmasq up ADDR:PORT [SERVER...] | down: while mptun runs, dnsmasq forwards to the
# client's `dns` listener (and to it only); the file lives in tmpfs and goes on stop, so the LAN's
# DNS falls back to the usual upstreams when the tunnel is stopped, and no flash is written. The
# client resolves a server given by name through the system resolver, that is through dnsmasq:
# those names go to the uplinks' own DNS servers, or the tunnel would wait for itself.
mptun_dnsmasq() {
	local op=$1 listen=$2 dir changed='' host port name ns
	if [ "$op" = up ]; then shift 2; else shift; fi
	for dir in $(mptun_dnsmasq_conf_dirs); do
		if [ "$op" = up ]; then
			host=${listen%:*}
			port=${listen##*:}
			host=${host#[}
			host=${host%]}
			mkdir -p "$dir"
			{
				echo "# written by /etc/init.d/mptun while it runs"
				echo "no-resolv"
				echo "server=$host#$port"
				for name in $(_mptun_server_names "$@"); do
					for ns in $(_mptun_wan_nameservers); do
						echo "server=/$name/$ns"
					done
				done
			} >"$dir/mptun.conf.new"
			cmp -s "$dir/mptun.conf.new" "$dir/mptun.conf" || changed=1
			mv "$dir/mptun.conf.new" "$dir/mptun.conf"
		elif [ -e "$dir/mptun.conf" ]; then
			rm -f "$dir/mptun.conf"
			changed=1
		fi
	done
	# dnsmasq reads its conf-dir only when it starts
	[ -n "$changed" ] && [ -z "$MPTUN_ROOT" ] && /etc/init.d/dnsmasq restart >/dev/null 2>&1
	return 0
}

# Run as a program (not sourced): `mptun.sh uplink-state DEVICE STATE`, the client's
# --uplink-hook (the init script passes it).
if [ "${0##*/}" = mptun.sh ]; then
	case "$1" in
	uplink-state)
		[ "$#" = 3 ] || {
			echo "usage: mptun.sh uplink-state DEVICE STATE" >&2
			exit 2
		}
		# shellcheck source=/dev/null  # OpenWrt library
		. "$MPTUN_ROOT/lib/functions.sh"
		# shellcheck source=/dev/null
		. "$MPTUN_ROOT/lib/functions/network.sh"
		config_load mptun
		mptun_uplink_state "$2" "$3"
		exit
		;;
	*)
		echo "usage: mptun.sh uplink-state DEVICE STATE (else it is sourced)" >&2
		exit 2
		;;
	esac
fi
