// The standard PAC helper functions, loaded into every sandbox before the PAC script.
//
// Behaviour follows the Netscape specification as implemented by Mozilla's and Chromium's
// pac_utils.js (differences are listed in egress/src/pac/mod.rs), plus Microsoft's IPv6
// extensions. The natives (__sp_*) are Rust functions defined by egress/src/pac/engine.rs:
//   __sp_dnsResolve(host) -> first IPv4 address or ""      __sp_dnsResolveEx(host) -> "a;b" or ""
//   __sp_myIpAddress() -> IPv4 address                      __sp_myIpAddressEx() -> "a;b"
//   __sp_isInNetEx(ips, prefix) -> bool                     __sp_sortIpAddressList(list) -> "a;b" or ""
//   __sp_shExpMatch(str, pattern) -> bool                   __sp_alert(message)
//   __sp_clock() -> ms since 1970 (UTC)                     __sp_utcOffset() -> minutes east, or null
// Arguments are turned into strings here, so the natives always receive strings.

function isPlainHostName(host) {
  return String(host).search(/[.:]/) === -1;
}

function dnsDomainIs(host, domain) {
  host = String(host);
  domain = String(domain);
  return host.length >= domain.length &&
    host.substring(host.length - domain.length) === domain;
}

function localHostOrDomainIs(host, hostdom) {
  host = String(host);
  hostdom = String(hostdom);
  return host === hostdom || hostdom.lastIndexOf(host + '.', 0) === 0;
}

function dnsDomainLevels(host) {
  return String(host).split('.').length - 1;
}

function __sp_isIPv4(s) {
  var m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(String(s));
  return m !== null && m[1] <= 255 && m[2] <= 255 && m[3] <= 255 && m[4] <= 255;
}

function convert_addr(ipchars) {
  var bytes = String(ipchars).split('.');
  return ((bytes[0] & 0xff) << 24) | ((bytes[1] & 0xff) << 16) |
    ((bytes[2] & 0xff) << 8) | (bytes[3] & 0xff);
}

function dnsResolve(host) {
  var ip = __sp_dnsResolve(String(host));
  return ip === '' ? null : ip;
}

function isResolvable(host) {
  return dnsResolve(host) !== null;
}

function isInNet(ipaddr, pattern, maskstr) {
  if (!__sp_isIPv4(pattern) || !__sp_isIPv4(maskstr)) {
    return false;
  }
  if (!__sp_isIPv4(ipaddr)) {
    ipaddr = dnsResolve(ipaddr);
    if (ipaddr === null) {
      return false;
    }
  }
  var mask = convert_addr(maskstr);
  return (convert_addr(ipaddr) & mask) === (convert_addr(pattern) & mask);
}

function myIpAddress() {
  return __sp_myIpAddress();
}

function shExpMatch(str, shexp) {
  return __sp_shExpMatch(String(str), String(shexp));
}

function alert(message) {
  __sp_alert(String(message));
}

// Microsoft's IPv6-aware extensions.

function dnsResolveEx(host) {
  return __sp_dnsResolveEx(String(host));
}

function isResolvableEx(host) {
  return dnsResolveEx(host) !== '';
}

function myIpAddressEx() {
  return __sp_myIpAddressEx();
}

function isInNetEx(ipaddr, ipprefix) {
  return __sp_isInNetEx(String(ipaddr), String(ipprefix));
}

function sortIpAddressList(list) {
  var sorted = __sp_sortIpAddressList(String(list));
  return sorted === '' ? false : sorted;
}

function getClientVersion() {
  return '1.0';
}

// Dates and times. "now" comes from the host (injectable); a last argument "GMT" means UTC.

var __sp_days = ['SUN', 'MON', 'TUE', 'WED', 'THU', 'FRI', 'SAT'];
var __sp_months = ['JAN', 'FEB', 'MAR', 'APR', 'MAY', 'JUN',
  'JUL', 'AUG', 'SEP', 'OCT', 'NOV', 'DEC'];

// The arguments as an array, and whether the last one was "GMT" (removed).
function __sp_args(args) {
  var a = [];
  for (var i = 0; i < args.length; i++) {
    a.push(args[i]);
  }
  var gmt = a.length > 0 && String(a[a.length - 1]).toUpperCase() === 'GMT';
  if (gmt) {
    a.pop();
  }
  return { list: a, gmt: gmt };
}

function __sp_now(gmt) {
  var ms = __sp_clock();
  var offset = gmt ? 0 : __sp_utcOffset();
  if (offset == null) {
    var l = new Date(ms);
    return {
      wday: l.getDay(), day: l.getDate(), month: l.getMonth(), year: l.getFullYear(),
      hour: l.getHours(), min: l.getMinutes(), sec: l.getSeconds()
    };
  }
  var d = new Date(ms + offset * 60000);
  return {
    wday: d.getUTCDay(), day: d.getUTCDate(), month: d.getUTCMonth(),
    year: d.getUTCFullYear(), hour: d.getUTCHours(), min: d.getUTCMinutes(),
    sec: d.getUTCSeconds()
  };
}

// lo..hi inclusive; when lo > hi the range wraps around (FRI..MON, DEC..FEB, 22..6).
function __sp_within(lo, hi, t, wrap) {
  if (lo <= hi) {
    return lo <= t && t <= hi;
  }
  return wrap && (t >= lo || t <= hi);
}

// An integer argument (a number or a string of digits), or NaN.
function __sp_int(v) {
  if (typeof v === 'number') {
    return v % 1 === 0 ? v : NaN;
  }
  var s = String(v);
  return /^\s*\d{1,9}\s*$/.test(s) ? parseInt(s, 10) : NaN;
}

function weekdayRange() {
  var a = __sp_args(arguments);
  if (a.list.length < 1 || a.list.length > 2) {
    return false;
  }
  var wd1 = __sp_days.indexOf(String(a.list[0]).toUpperCase());
  var wd2 = a.list.length === 2 ? __sp_days.indexOf(String(a.list[1]).toUpperCase()) : wd1;
  if (wd1 < 0 || wd2 < 0) {
    return false;
  }
  return __sp_within(wd1, wd2, __sp_now(a.gmt).wday, true);
}

// dateRange(day | month | year [, same kind]) and the longer forms
// dateRange(day1, month1, day2, month2), dateRange(month1, year1, month2, year2),
// dateRange(day1, month1, year1, day2, month2, year2). Days are 1..31, years 32 and up
// (as in Mozilla's code), months JAN..DEC.
function dateRange() {
  var a = __sp_args(arguments);
  var v = [];
  var kinds = '';
  for (var i = 0; i < a.list.length; i++) {
    var n = __sp_int(a.list[i]);
    if (!isNaN(n)) {
      if (n >= 1 && n <= 31) {
        kinds += 'd';
      } else if (n >= 32) {
        kinds += 'y';
      } else {
        return false;
      }
      v.push(n);
    } else {
      var m = __sp_months.indexOf(String(a.list[i]).toUpperCase());
      if (m < 0) {
        return false;
      }
      kinds += 'm';
      v.push(m);
    }
  }
  var now = __sp_now(a.gmt);
  var d = now.day, m0 = now.month, y = now.year;
  switch (kinds) {
    case 'd': return d === v[0];
    case 'm': return m0 === v[0];
    case 'y': return y === v[0];
    case 'dd': return __sp_within(v[0], v[1], d, true);
    case 'mm': return __sp_within(v[0], v[1], m0, true);
    case 'yy': return __sp_within(v[0], v[1], y, false);
    case 'dmdm': return __sp_within(v[1] * 32 + v[0], v[3] * 32 + v[2], m0 * 32 + d, true);
    case 'mymy': return __sp_within(v[1] * 12 + v[0], v[3] * 12 + v[2], y * 12 + m0, false);
    case 'dmydmy':
      return __sp_within((v[2] * 12 + v[1]) * 32 + v[0], (v[5] * 12 + v[4]) * 32 + v[3],
        (y * 12 + m0) * 32 + d, false);
    default: return false;
  }
}

// timeRange(hour), timeRange(h1, h2) (h1:00:00 to h2:59:59), timeRange(h1, m1, h2, m2)
// (h1:m1:00 to h2:m2:59), timeRange(h1, m1, s1, h2, m2, s2).
function timeRange() {
  var a = __sp_args(arguments);
  var v = [];
  for (var i = 0; i < a.list.length; i++) {
    var n = __sp_int(a.list[i]);
    if (isNaN(n)) {
      return false;
    }
    v.push(n);
  }
  var now = __sp_now(a.gmt);
  var t = now.hour * 3600 + now.min * 60 + now.sec;
  switch (v.length) {
    case 1: return now.hour === v[0];
    case 2: return __sp_within(v[0] * 3600, v[1] * 3600 + 3599, t, true);
    case 4: return __sp_within(v[0] * 3600 + v[1] * 60, v[2] * 3600 + v[3] * 60 + 59, t, true);
    case 6:
      return __sp_within(v[0] * 3600 + v[1] * 60 + v[2], v[3] * 3600 + v[4] * 60 + v[5], t, true);
    default: return false;
  }
}
