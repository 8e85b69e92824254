// The smallest stand-in for LuCI's loader that runs luci-app-mptun's views, in headless Chromium
// (tests/test_luci.py) and in node (no DOM: the settings page's declarations only).
//
// What it keeps of LuCI (luci-base htdocs/luci-static/resources/luci.js): a view file is the
// body of a function compiled as `(function(window, document, L, DEPS...) { SOURCE })`, its
// DEPS named by the leading 'require NAME [as ALIAS]' strings; the factory returns a class
// that is instantiated, and a view's constructor runs load(), then render(), and puts the
// result into #view. E() and dom.append/content build nodes as L.dom.create/append do,
// including that a lone string child becomes innerHTML while an array's strings become text
// nodes (the status page relies on the array form for text from the client). rpc.declare
// returns a function giving the next recorded reply of OBJECT.METHOD, with `expect` applied;
// poll.add runs its function every INTERVAL seconds. form records the settings page's
// sections and options (type, name, placeholder, default, choices) and shows their titles.
// Left out: translation (_() returns its text), the session, ubus batching, CSS, form widgets
// and saving: a real LuCI runs those (openwrt/README.md lists what is not verified).
(function(root) {
	'use strict';

	var doc = (typeof document !== 'undefined') ? document : null;
	var log = { calls: [], polls: [], declared: [], errors: [] };

	function Class() {}
	Class.extend = function(props) {
		var Base = this;
		var C = function() {
			if (typeof this.__init__ === 'function')
				this.__init__.apply(this, arguments);
		};
		C.prototype = Object.create(Base.prototype);
		Object.keys(props).forEach(function(k) { C.prototype[k] = props[k] });
		C.prototype.constructor = C;
		C.extend = Class.extend;
		return C;
	};

	var dom = {
		elem: function(e) { return e != null && typeof e === 'object' && 'nodeType' in e },
		append: function(node, children) {
			if (!this.elem(node))
				return null;
			if (Array.isArray(children)) {
				children.forEach(function(c) {
					if (dom.elem(c))
						node.appendChild(c);
					else if (c !== null && c !== undefined)
						node.appendChild(doc.createTextNode('' + c));
				});
				return node.lastChild;
			}
			if (this.elem(children))
				return node.appendChild(children);
			if (children !== null && children !== undefined)
				node.innerHTML = '' + children;  // as LuCI does: a lone string is markup
			return node.lastChild;
		},
		content: function(node, children) {
			while (node.firstChild)
				node.removeChild(node.firstChild);
			return this.append(node, children);
		},
		create: function(html, attr, data) {
			if (!(attr instanceof Object) || Array.isArray(attr))
				data = attr, attr = null;
			var elem = doc.createElement(html);
			Object.keys(attr || {}).forEach(function(k) {
				var v = attr[k];
				if (v == null)
					return;
				if (typeof v === 'function')
					elem.addEventListener(k, v);
				else
					elem.setAttribute(k, typeof v === 'object' ? JSON.stringify(v) : v);
			});
			this.append(elem, data);
			return elem;
		}
	};

	function E() { return dom.create.apply(dom, arguments) }
	function translate(s) { return s }

	var fixtures = {};  // 'object.method' -> replies, in order; the last one repeats

	var rpc = {
		declare: function(opts) {
			var key = opts.object + '.' + opts.method;
			return function() {
				log.calls.push(key);
				var queue = fixtures[key];
				if (!queue || !queue.length)
					return Promise.reject(new Error('no reply recorded for ' + key));
				var reply = JSON.parse(JSON.stringify(queue.length > 1 ? queue.shift() : queue[0]));
				var expect = opts.expect, k = expect ? Object.keys(expect)[0] : null;
				if (k != null) {
					var picked = (k === '') ? reply : reply[k];
					reply = (picked == null) ? expect[k] : picked;
				}
				return Promise.resolve(reply);
			};
		}
	};

	var poll = {
		add: function(fn, interval) {
			log.polls.push(interval);
			setInterval(function() {
				Promise.resolve(fn()).catch(function(e) { log.errors.push(String(e && e.stack || e)) });
			}, interval * 1000);
		}
	};

	function Option(cls, section, name, title) {
		this.cls = cls; this.name = name; this.title = title; this.choices = [];
		this.section = section;
	}
	Option.prototype.value = function(k, v) { this.choices.push(k) };

	function optionClass(kind) {
		return function() { this.kind = kind };
	}

	function Section(map, cls, type, title) {
		this.map = map; this.cls = cls; this.type = type; this.title = title; this.options = [];
	}
	Section.prototype.option = function(cls, name, title) {
		var o = new Option(cls, this, name, title);
		this.options.push(o);
		return o;
	};

	function FormMap(config, title) {
		this.config = config; this.title = title; this.sections = [];
	}
	FormMap.prototype.section = function(cls, type, title) {
		var s = new Section(this, cls, type, title);
		this.sections.push(s);
		return s;
	};
	FormMap.prototype.render = function() {
		var map = this;
		map.sections.forEach(function(s) {
			s.options.forEach(function(o) {
				log.declared.push({
					config: map.config, section: s.type, option: o.name, kind: new o.cls().kind,
					placeholder: o.placeholder, default: o.default, choices: o.choices,
					datatype: o.datatype
				});
			});
		});
		if (!doc)
			return Promise.resolve(null);
		return Promise.resolve(E('div', { 'class': 'cbi-map' }, [ E('h2', {}, [ map.title ]) ].concat(
			map.sections.map(function(s) {
				return E('fieldset', { 'class': 'cbi-section' }, [ E('legend', {}, [ s.title ]) ].concat(
					s.options.map(function(o) {
						return E('div', { 'class': 'cbi-value', 'data-name': o.name }, [ o.title ]);
					})));
			}))));
	};

	var form = {
		Map: FormMap,
		TypedSection: optionClass('TypedSection'),
		NamedSection: optionClass('NamedSection'),
		GridSection: optionClass('GridSection'),
		Value: optionClass('Value'),
		Flag: optionClass('Flag'),
		ListValue: optionClass('ListValue'),
		DynamicList: optionClass('DynamicList')
	};
	var widgets = {
		NetworkSelect: optionClass('NetworkSelect'),
		DeviceSelect: optionClass('DeviceSelect')
	};

	var L = { bind: function(fn, self) { return fn.bind(self) }, env: { pollinterval: 5 } };

	var view = {
		extend: function(props) {
			return Class.extend(Object.assign({
				__init__: function() {
					var self = this;
					this.done = Promise.resolve(this.load()).then(function(data) {
						return self.render(data);
					}).then(function(node) {
						if (doc && node)
							dom.content(doc.getElementById('view'), node);
					}).catch(function(e) {
						log.errors.push(String(e && e.stack || e));
					});
				},
				load: function() {},
				render: function() {}
			}, props));
		}
	};

	var modules = {
		view: view, rpc: rpc, poll: poll, dom: dom, form: form, 'tools.widgets': widgets
	};

	// The leading directive strings of a view ('use strict', 'require NAME [as ALIAS]').
	function directives(source) {
		var out = [], re = /^\s*(?:\/\/[^\n]*\n\s*)*(['"])([^'"\n]*)\1;?/, rest = source, m;
		while ((m = re.exec(rest)) !== null) {
			out.push(m[2]);
			rest = rest.slice(m[0].length);
		}
		return out;
	}

	function load(name, source) {
		var names = [], deps = [];
		directives(source).forEach(function(d) {
			var m = /^require[ \t]+(\S+)(?:[ \t]+as[ \t]+([a-zA-Z_]\S*))?$/.exec(d);
			if (!m)
				return;
			if (!(m[1] in modules))
				throw new Error(name + ': the stand-in has no module ' + m[1]);
			names.push(m[2] || m[1].replace(/[^a-zA-Z0-9_]/g, '_'));
			deps.push(modules[m[1]]);
		});
		var factory = Function.apply(null, [ 'window', 'document', 'L' ].concat(names, [ source ]));
		var cls = factory.apply(factory, [ root, doc, L ].concat(deps));
		if (typeof cls !== 'function')
			throw new TypeError(name + ' factory yields no class');
		return new cls();
	}

	root.E = E;
	root._ = translate;
	root.LuciStandin = {
		log: log,
		load: load,
		directives: directives,
		reply: function(key, replies) { fixtures[key] = replies.slice() }
	};
})(typeof window !== 'undefined' ? window : globalThis);
