#!/bin/sh
# shellcheck shell=ash
# A stand-in for the procd helpers /etc/rc.common provides to init scripts (/lib/functions/procd.sh
# builds a JSON message for procd over ubus, which does not run here). Each call is appended to
# $PROCD_LOG, one line a call, words separated by tabs, so a test reads what would reach procd.

_procd_log() {
	local IFS='	'
	echo "$*" >>"$PROCD_LOG"
}

procd_open_instance() { _procd_log open_instance "$@"; }
procd_set_param() { _procd_log set_param "$@"; }
procd_append_param() { _procd_log append_param "$@"; }
procd_close_instance() { _procd_log close_instance; }
procd_add_reload_trigger() { _procd_log add_reload_trigger "$@"; }
procd_add_reload_interface_trigger() { _procd_log add_reload_interface_trigger "$@"; }
procd_add_interface_trigger() { _procd_log add_interface_trigger "$@"; }

# rc.common's start and stop of a procd service (procd_open_service and procd_kill around the
# service's own functions): recorded, then the service's function runs.
start() {
	_procd_log start
	start_service "$@"
}
stop() {
	_procd_log stop
	stop_service "$@"
}
