'use strict';
'require view';
'require rpc';
'require poll';
'require dom';

// The mptun client's status, read through the luci.mptun rpcd plugin from the client's control
// socket (its `mptun status` document) every POLL_SECONDS. Every text from the document is put
// into the page as a text node, never as HTML: targets and peers come from the LAN.

var POLL_SECONDS = 5;

var callStatus = rpc.declare({
	object: 'luci.mptun',
	method: 'status',
	expect: { '': {} }
});

// Text nodes only: dom.append turns a lone string child into innerHTML, an array into text.
function text(value) {
	return [ (value == null) ? '-' : String(value) ];
}

function bytes(n) {
	if (typeof(n) != 'number' || !isFinite(n))
		return '-';
	var units = [ 'B', 'KiB', 'MiB', 'GiB', 'TiB' ], i = 0;
	while (Math.abs(n) >= 1024 && i < units.length - 1) {
		n /= 1024;
		i++;
	}
	return (i ? n.toFixed(1) : String(Math.round(n))) + ' ' + units[i];
}

function rate(n) {
	return (n == null) ? '-' : bytes(n) + '/s';
}

function ms(v) {
	return (typeof(v) == 'number') ? v.toFixed(1) + ' ms' : '-';
}

function table(headers, rows, empty) {
	var t = E('table', { 'class': 'table' }, [
		E('tr', { 'class': 'tr table-titles' }, headers.map(function(h) {
			return E('th', { 'class': 'th' }, text(h));
		}))
	]);
	rows.forEach(function(cells) {
		t.appendChild(E('tr', { 'class': 'tr' }, cells.map(function(c) {
			return E('td', { 'class': 'td' }, (c != null && c.nodeType) ? [ c ] : text(c));
		})));
	});
	if (!rows.length)
		t.appendChild(E('tr', { 'class': 'tr placeholder' }, [
			E('td', { 'class': 'td', 'colspan': String(headers.length) }, text(empty))
		]));
	return t;
}

function section(title, body) {
	return E('div', { 'class': 'cbi-section' }, [ E('h3', {}, text(title)) ].concat(body));
}

// Bytes each way per tunnel and per subflow: rates are the growth between two polls.
function counters(doc) {
	var out = { conns: {}, subflows: {} };
	(doc.connections || []).forEach(function(c) {
		out.conns[c.id] = [ c.bytes_received || 0, c.bytes_acked || 0, c.seconds || 0 ];
		(c.subflows || []).forEach(function(sf) {
			out.subflows[c.id + '/' + sf.id + '/' + sf.local] = {
				ip: sf.local_ip, down: sf.bytes_received || 0, up: sf.bytes_acked || 0
			};
		});
	});
	return out;
}

return view.extend({
	prev: null,

	load: function() {
		return callStatus();
	},

	// Down and up rates (bytes/s) of the tunnels, and of each local address, since the last
	// poll; a tunnel opened since then counts from zero, one closed since then is left out.
	rates: function(reply) {
		var now = counters(reply.client || {}), prev = this.prev, out = null;
		if (prev && reply.at > prev.at) {
			var dt = reply.at - prev.at, down = 0, up = 0, byIp = {};
			for (var id in now.conns) {
				var a = now.conns[id], b = prev.seen.conns[id];
				if (!b && a[2] > dt + 1)
					continue;  // not new, but unseen: its bytes are not all from this interval
				down += a[0] - (b ? b[0] : 0);
				up += a[1] - (b ? b[1] : 0);
			}
			for (var key in now.subflows) {
				var s = now.subflows[key], p = prev.seen.subflows[key] || { down: 0, up: 0 };
				var r = byIp[s.ip] || (byIp[s.ip] = { down: 0, up: 0 });
				r.down += Math.max(0, s.down - p.down) / dt;
				r.up += Math.max(0, s.up - p.up) / dt;
			}
			out = { down: Math.max(0, down) / dt, up: Math.max(0, up) / dt, byIp: byIp };
		}
		this.prev = { at: reply.at, seen: now };
		return out;
	},

	renderTunnel: function(doc, rates) {
		var servers = doc.servers || [];
		var up = servers.some(function(s) { return s.state == 'up' });
		var conns = doc.connections || [];
		var total = conns.reduce(function(acc, c) {
			return [ acc[0] + (c.bytes_received || 0), acc[1] + (c.bytes_acked || 0) ];
		}, [ 0, 0 ]);
		var rows = [
			[ _('Tunnel'), up ? _('up') : (servers.length ? _('down: no server answers') : _('starting')) ],
			[ _('Server'), doc.server ],
			[ _('Transport'), doc.transport ],
			[ _('Listening on'), (doc.listeners || []).join(', ') ],
			[ _('Tunnels relaying'), conns.length + (doc.connections_omitted ? ' (+' + doc.connections_omitted + ')' : '') ],
			[ _('Download'), rates ? rate(rates.down) : _('measuring…') ],
			[ _('Upload'), rates ? rate(rates.up) : _('measuring…') ],
			[ _('Received / sent by the open tunnels'), bytes(total[0]) + ' / ' + bytes(total[1]) ],
			[ _('Client process'), doc.pid ]
		];
		var body = [ table([ _('Property'), _('Value') ], rows, '') ];
		if (servers.length > 1 || servers.some(function(s) { return s.state != 'up' }))
			body.push(table([ _('Server'), _('State'), _('Check round trip'), _('Reason') ],
				servers.map(function(s) {
					return [ s.server + (s.preferred ? ' *' : ''), s.state, ms(s.rtt_ms), s.reason || '' ];
				}), _('No server')));
		return section(_('mptun tunnel'), body);
	},

	// One row per probed uplink (--uplink), then one per other local address subflows use.
	renderUplinks: function(doc, rates) {
		var health = doc.uplink_health || [], byIp = {}, rows = [];
		(doc.connections || []).forEach(function(c) {
			(c.subflows || []).forEach(function(sf) {
				byIp[sf.local_ip] = (byIp[sf.local_ip] || 0) + 1;
			});
		});
		var sum = function(ips, what) {
			if (!rates)
				return null;
			return ips.reduce(function(acc, ip) {
				return acc + ((rates.byIp[ip] || {})[what] || 0);
			}, 0);
		};
		var claimed = {};
		health.forEach(function(u) {
			var ips = u.addresses || [];
			ips.forEach(function(ip) { claimed[ip] = true });
			rows.push([
				u.name, u.state + (u.reason ? ': ' + u.reason : ''),
				(typeof(u.loss) == 'number') ? (u.loss * 100).toFixed(0) + ' %' : '-', ms(u.rtt_ms),
				ips.reduce(function(n, ip) { return n + (byIp[ip] || 0) }, 0),
				rate(sum(ips, 'down')), rate(sum(ips, 'up'))
			]);
		});
		Object.keys(byIp).sort().forEach(function(ip) {
			if (!claimed[ip])
				rows.push([ ip, _('not probed'), '-', '-', byIp[ip], rate(sum([ ip ], 'down')),
					rate(sum([ ip ], 'up')) ]);
		});
		return section(_('Uplinks'), [ table(
			[ _('Uplink'), _('Health'), _('Loss'), _('Round trip'), _('Subflows'), _('Download'), _('Upload') ],
			rows, _('No uplink is probed (option uplink) and no tunnel is open')) ]);
	},

	renderTunnels: function(doc) {
		var kinds = { mptcp: 'MPTCP', fallback: _('TCP (MPTCP fell back)'), tcp: 'TCP' };
		return section(_('Tunnels'), [ table(
			[ _('Source'), _('Target'), _('Kind'), _('Subflows'), _('Age'), _('Received'), _('Sent') ],
			(doc.connections || []).map(function(c) {
				return [ c.source, c.target, kinds[c.kind] || c.kind, (c.subflows || []).length,
					Math.round(c.seconds || 0) + ' s', bytes(c.bytes_received), bytes(c.bytes_acked) ];
			}), _('No tunnel is open')) ]);
	},

	// UDP associations, when the client reports them (`udp`: a list of objects, or gauges).
	renderUdp: function(doc) {
		var udp = doc.udp;
		if (udp == null)
			return null;
		if (Array.isArray(udp)) {
			var cols = [];
			udp.forEach(function(a) {
				Object.keys(a || {}).forEach(function(k) { if (cols.indexOf(k) < 0) cols.push(k) });
			});
			return section(_('UDP associations'), [ table(cols, udp.map(function(a) {
				return cols.map(function(k) { return (a || {})[k] });
			}), _('No UDP association')) ]);
		}
		return section(_('UDP'), [ table([ _('Gauge'), _('Value') ],
			Object.keys(udp).sort().map(function(k) { return [ k, udp[k] ] }), '') ]);
	},

	renderCounters: function(doc) {
		var c = doc.counters || {};
		return section(_('Counters since the client started'), [ table([ _('Counter'), _('Value') ],
			Object.keys(c).sort().map(function(k) { return [ k, c[k] ] }), _('None yet')) ]);
	},

	renderBody: function(reply) {
		reply = reply || {};
		if (reply.error && !reply.control)
			return E('div', { 'class': 'alert-message error' }, text(reply.error));
		var rates = this.rates(reply);
		if (!reply.running)
			return E('div', { 'class': 'alert-message warning', 'id': 'mptun-down' }, [
				E('strong', {}, text(_('The mptun client is not running or does not answer.'))),
				E('br'), E('span', {}, text(reply.error))
			]);
		var doc = reply.client || {};
		return E('div', { 'id': 'mptun-up' }, [
			this.renderTunnel(doc, rates), this.renderUplinks(doc, rates), this.renderTunnels(doc),
			this.renderUdp(doc), this.renderCounters(doc)
		].filter(function(n) { return n != null }));
	},

	render: function(reply) {
		var body = E('div', { 'id': 'mptun-status' }, [ this.renderBody(reply) ]);
		poll.add(L.bind(function() {
			return callStatus().then(L.bind(function(r) {
				dom.content(body, [ this.renderBody(r) ]);
			}, this));
		}, this), POLL_SECONDS);
		return E('div', {}, [ E('h2', {}, text(_('mptun status'))), body ]);
	},

	handleSave: null,
	handleSaveApply: null,
	handleReset: null
});
