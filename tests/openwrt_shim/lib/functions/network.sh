#!/bin/sh
# shellcheck shell=ash
# A stand-in for OpenWrt's /lib/functions/network.sh, for tests only: the real one asks netifd over
# ubus, which does not run here. Same calls, same contract (set VAR, fail when unknown); the
# answers come from files the test writes: $MPTUN_ROOT/netifd/IFACE/{device,ipaddrs,ipaddrs6,
# gateway,gateway6,up}.

# shellcheck disable=SC2034  # v is read through eval
_shim_net() {
	local f="$MPTUN_ROOT/netifd/$3/$2" v
	[ -s "$f" ] || return 1
	v=$(cat "$f")
	eval "$1=\$v"
}

network_get_device() { _shim_net "$1" device "$2"; }
network_get_physdev() { _shim_net "$1" device "$2"; }
network_get_ipaddrs() { _shim_net "$1" ipaddrs "$2" || eval "$1="; }
network_get_ipaddrs6() { _shim_net "$1" ipaddrs6 "$2" || eval "$1="; }
network_get_gateway() { _shim_net "$1" gateway "$2" || eval "$1="; }
network_get_gateway6() { _shim_net "$1" gateway6 "$2" || eval "$1="; }
network_is_up() { [ -e "$MPTUN_ROOT/netifd/$1/up" ]; }
