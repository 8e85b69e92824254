#!/bin/sh
# shellcheck shell=ash
# A stand-in for OpenWrt's /lib/functions.sh (package/base-files), for tests only: the real one is
# not installable on the test machine. It keeps the real one's contract for the calls mptun's
# scripts make: config_load evaluates the UCI file through `config`/`option`/`list` callbacks
# (the real one evaluates `uci export` output, which is the same syntax), and config_get,
# config_get_bool and config_foreach read the CONFIG_<section>_<option> variables it sets.

CONFIG_SECTIONS=
CONFIG_SECTION=
_shim_anon=0

config() {
	local type=$1 name=$2
	if [ -z "$name" ]; then
		_shim_anon=$((_shim_anon + 1))
		name="cfg$_shim_anon"
	fi
	case " $CONFIG_SECTIONS " in *" $name "*) ;; *) CONFIG_SECTIONS="$CONFIG_SECTIONS $name" ;; esac
	CONFIG_SECTION=$name
	export "CONFIG_${name}_TYPE=$type"
}

option() {
	export "CONFIG_${CONFIG_SECTION}_$1=$2"
}

list() {
	local old
	eval "old=\${CONFIG_${CONFIG_SECTION}_$1:-}"
	export "CONFIG_${CONFIG_SECTION}_$1=${old:+$old }$2"
}

package() { :; }

config_load() {
	CONFIG_SECTIONS=
	# shellcheck source=/dev/null
	. "$MPTUN_ROOT/etc/config/$1"
}

config_get() {
	local _v
	eval "_v=\${CONFIG_$2_$3:-}"
	[ -n "$_v" ] || _v=$4
	eval "$1=\$_v"
}

config_get_bool() {
	local _b
	config_get _b "$2" "$3" "$4"
	case "$_b" in
	1 | on | true | yes | enabled) _b=1 ;;
	0 | off | false | no | disabled) _b=0 ;;
	*) _b=$4 ;;
	esac
	eval "$1=\$_b"
}

config_foreach() {
	local fn=$1 type=$2 sec t
	for sec in $CONFIG_SECTIONS; do
		eval "t=\${CONFIG_${sec}_TYPE:-}"
		[ "$t" = "$type" ] && "$fn" "$sec"
	done
	return 0
}
