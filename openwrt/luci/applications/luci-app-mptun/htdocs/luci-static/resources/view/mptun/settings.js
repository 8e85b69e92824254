'use strict';
'require view';
'require form';
'require tools.widgets as widgets';

// /etc/config/mptun as the init script and `mptun client --uci` read it: `config client` (the
// long options of `mptun client`, _ for -), `config uplinks`, `config nft` (`mptun nft`'s
// options) and one `config uplink` per OpenWrt interface. Saving commits the file; procd then
// sends the client SIGHUP (reload_signal), which re-reads it without dropping connections.
// Every option name here is one `mptun uci /etc/config/mptun` accepts (tests/test_luci.py).

return view.extend({
	render: function() {
		var m, s, o;

		m = new form.Map('mptun', _('mptun'),
			_('Multipath TCP tunnel to an mptun server: the router\'s uplinks joined into one ' +
			  'tunnel. The pre-shared key stays in its own root-only file (key_file), not here.'));

		s = m.section(form.TypedSection, 'client', _('Client'));
		s.anonymous = true;
		s.addremove = false;

		o = s.option(form.Flag, 'enabled', _('Enabled'));
		o.default = '0';
		o.rmempty = false;

		o = s.option(form.DynamicList, 'server', _('Server'),
			_('HOST:PORT of the mptun server; more for backup servers, in order of preference.'));
		o.placeholder = 'vps.example.net:8443';
		o.rmempty = false;

		o = s.option(form.ListValue, 'server_policy', _('Server policy'),
			_('With several servers: the first that answers, or the lowest check round trip.'));
		o.value('failover', _('failover'));
		o.value('lowest-rtt', _('lowest round trip'));
		o.default = 'failover';

		o = s.option(form.ListValue, 'when_down', _('When every server is down'));
		o.value('reject', _('refuse new connections'));
		o.value('direct', _('connect directly, untunnelled'));
		o.default = 'reject';

		o = s.option(form.Value, 'key_file', _('Key file'),
			_('File holding the key the VPS installer printed (mode 600).'));
		o.placeholder = '/etc/mptun/key';
		o.default = '/etc/mptun/key';

		o = s.option(form.Value, 'socks', _('SOCKS5 listener'), _('HOST:PORT, on loopback or the LAN.'));
		o.placeholder = '127.0.0.1:1080';

		o = s.option(form.Value, 'redir', _('Redirect listener'),
			_('HOST:PORT for the LAN\'s TCP that the firewall redirects (gateway mode, with the ' +
			  'firewall section below).'));
		o.placeholder = '0.0.0.0:1081';

		o = s.option(form.Value, 'tproxy', _('TPROXY listener'),
			_('HOST:PORT for the LAN\'s TCP handed over by nftables tproxy (firewall mode tproxy).'));
		o.placeholder = '0.0.0.0:1082';

		o = s.option(form.Value, 'dns', _('DNS listener'),
			_('HOST:PORT answering DNS through the tunnel; dnsmasq forwards to it while mptun runs.'));
		o.placeholder = '127.0.0.1:5353';

		o = s.option(form.Value, 'dns_upstream', _('DNS upstream'),
			_('The resolver the VPS asks, HOST[:PORT].'));
		o.placeholder = '1.1.1.1:53';

		o = s.option(form.ListValue, 'cipher', _('Cipher'), _('Both ends must agree.'));
		o.value('aes-256-gcm');
		o.value('chacha20-poly1305');
		o.default = 'aes-256-gcm';

		o = s.option(form.ListValue, 'transport', _('Transport'));
		o.value('mptcp', 'MPTCP');
		o.value('tcp', 'TCP');
		o.default = 'mptcp';

		o = s.option(form.ListValue, 'bulk', _('Bulk data'));
		o.value('auto', _('auto (kTLS where the kernel takes it)'));
		o.value('aead', 'AEAD');
		o.value('ktls', 'kTLS');
		o.value('plain', _('plain (unencrypted)'));
		o.default = 'auto';

		o = s.option(form.DynamicList, 'uplink', _('Probed uplinks'),
			_('Kernel devices (e.g. eth1, wwan0) whose health is probed; new tunnels avoid a dead ' +
			  'one. Empty: the device of every enabled uplink below.'));
		o.placeholder = 'eth1';

		o = s.option(form.ListValue, 'log_level', _('Log level'), _('What reaches the system log (logread).'));
		o.value('error');
		o.value('warning');
		o.value('info');
		o.value('debug');
		o.default = 'info';

		o = s.option(form.Flag, 'log_connections', _('Log every connection'),
			_('Who, where to and bytes, at info level: the LAN\'s destinations end up in the log.'));
		o.default = '0';

		s = m.section(form.TypedSection, 'uplinks', _('Uplink routing'),
			_('A routing table and source rules per uplink, and the MPTCP limits.'));
		s.anonymous = true;
		s.addremove = false;

		o = s.option(form.Value, 'table_base', _('First routing table'));
		o.datatype = 'uinteger';
		o.placeholder = '1500';

		o = s.option(form.Value, 'rule_priority', _('Rule priority'));
		o.datatype = 'uinteger';
		o.placeholder = '900';

		o = s.option(form.Value, 'subflows', _('Extra subflows per connection'));
		o.datatype = 'range(0,8)';
		o.placeholder = '8';

		o = s.option(form.DynamicList, 'backup', _('Backup uplinks'),
			_('Interfaces whose subflows carry data only when no other works (metered links).'));
		o.placeholder = 'wwan';

		s = m.section(form.GridSection, 'uplink', _('Uplinks'),
			_('OpenWrt interfaces the tunnel uses; each gets an MPTCP subflow endpoint while up.'));
		s.addremove = true;
		s.anonymous = false;
		s.nodescriptions = true;

		o = s.option(form.Flag, 'enabled', _('Enabled'));
		o.default = '1';

		o = s.option(widgets.NetworkSelect, 'interface', _('Interface'));
		o.nocreate = true;
		o.rmempty = false;
		o.placeholder = 'wan';

		s = m.section(form.TypedSection, 'nft', _('Firewall (gateway mode)'),
			_('nftables rules sending the LAN\'s TCP to the redirect or TPROXY listener.'));
		s.anonymous = true;
		s.addremove = false;

		o = s.option(form.Flag, 'enabled', _('Enabled'));
		o.default = '0';

		o = s.option(form.ListValue, 'mode', _('Mode'));
		o.value('redirect', _('redirect (redirect listener)'));
		o.value('tproxy', _('tproxy (TPROXY listener)'));
		o.default = 'redirect';

		o = s.option(form.Value, 'port', _('Listener port'), _('The redirect or TPROXY listener\'s port.'));
		o.datatype = 'port';
		o.placeholder = '1081';

		o = s.option(form.DynamicList, 'server', _('Server addresses'),
			_('The VPS, never redirected (prefer addresses: names are resolved once).'));
		o.placeholder = '203.0.113.7';

		o = s.option(widgets.DeviceSelect, 'lan', _('LAN devices'));
		o.multiple = true;
		o.noaliases = true;
		o.placeholder = 'br-lan';

		o = s.option(form.DynamicList, 'bypass', _('Direct destinations'), _('CIDRs reached without the tunnel.'));
		o.placeholder = '198.51.100.0/24';

		o = s.option(form.Value, 'dns_port', _('DNS port'), _('Redirect the LAN\'s DNS to this local port.'));
		o.datatype = 'port';
		o.placeholder = '5353';

		o = s.option(form.Flag, 'block_quic', _('Block QUIC'),
			_('Reject UDP port 443 from the LAN, so browsers use TCP through the tunnel.'));
		o.default = '1';

		return m.render();
	}
});
