/**
 * The local status page, served by the metrics/health listener (loopback by
 * default): `GET /` is one self-contained HTML page (inline style and script
 * allowed by their hashes in a strict Content-Security-Policy; no CDN, fonts or
 * other requests) that polls `GET /status.json` every few seconds.
 *
 * It stays cheap when nobody looks: a timer samples two existing counters
 * (messages in, messages acknowledged by the cloud) every `intervalMs` into a
 * fixed-size ring (15 minutes); nothing runs per message. Everything else is
 * read when the JSON is asked for, from the same status() the CLI shows.
 * The JSON is built from named facts only (never a raw component dump) and
 * passed through the logger's redaction before it leaves.
 */
import { createHash } from 'node:crypto';
import type { Registry } from 'prom-client';
import type { Component } from '../core/component.js';
import { redactValue, type LogRing, type LogEntry } from '../core/logger.js';
import type { DaemonStatus, Expiry } from './status.js';

export const STATUS_WINDOW_MS = 15 * 60 * 1000;
export const STATUS_INTERVAL_MS = 5000;
/** Certificates closer than this to their expiry are shown in the warning colour. */
export const EXPIRY_WARN_S = 14 * 86400;

/** Fixed-size ring of (time, value) samples; oldest overwritten. */
export class SampleRing {
  private readonly t: Float64Array;
  private readonly v: Float64Array;
  private next = 0;
  private count = 0;

  constructor(readonly size: number) {
    this.t = new Float64Array(size);
    this.v = new Float64Array(size);
  }

  push(t: number, v: number): void {
    this.t[this.next] = t;
    this.v[this.next] = v;
    this.next = (this.next + 1) % this.size;
    this.count = Math.min(this.count + 1, this.size);
  }

  get length(): number {
    return this.count;
  }

  /** Oldest first. */
  toArray(): { t: number; v: number }[] {
    const out: { t: number; v: number }[] = [];
    const start = (this.next - this.count + this.size) % this.size;
    for (let i = 0; i < this.count; i++) {
      const j = (start + i) % this.size;
      out.push({ t: this.t[j]!, v: this.v[j]! });
    }
    return out;
  }
}

/** Sum of a counter's series in the registry (those matching `labels`), or null when it is not registered. */
export async function counterValue(registry: Registry, name: string, labels: Record<string, string> = {}): Promise<number | null> {
  const m = registry.getSingleMetric(name);
  if (!m) return null;
  const got = await m.get();
  let sum = 0;
  for (const s of got.values) {
    if (Object.entries(labels).every(([k, v]) => s.labels[k] === v)) sum += s.value;
  }
  return sum;
}

export interface StatusPageOptions {
  registry: Registry;
  /** The daemon's status (the same as `connector status --json`). */
  status: () => DaemonStatus;
  /** The last warnings and errors, as logged (redacted). */
  logs?: LogRing;
  intervalMs?: number;
  windowMs?: number;
  now?: () => number;
}

export interface ThroughputSeries {
  interval_s: number;
  window_s: number;
  /** Sample times (epoch ms), oldest first; the rates are per second over the interval ending there. */
  t: number[];
  in_per_s: number[];
  delivered_per_s: number[];
}

export interface StatusJson {
  generated_at: string;
  version: string;
  uptime_s: number;
  ready: { ready: boolean; reasons: string[] };
  devices: { connected: number | null; registered: number | null };
  throughput: ThroughputSeries;
  journal: { messages: number | null; bytes: number | null; oldest_age_s: number | null; drain_per_s: number | null; in_per_s: number | null } | null;
  uplink: { state: string | null; connected: boolean; last_ack_age_s: number | null; reconnects: number | null; token_expires_at: string | null; token_expires_in_s: number | null } | null;
  certificates: (Expiry & { warn: boolean })[];
  logs: LogEntry[];
}

const round2 = (n: number): number => Math.round(n * 100) / 100;

export class StatusPage implements Component {
  readonly name = 'status-page';
  private readonly intervalMs: number;
  private readonly size: number;
  private readonly inRates: SampleRing;
  private readonly outRates: SampleRing;
  private last: { t: number; in: number | null; out: number | null } | undefined;
  private timer: NodeJS.Timeout | undefined;
  private sampling = false;

  constructor(private readonly opts: StatusPageOptions) {
    this.intervalMs = opts.intervalMs ?? STATUS_INTERVAL_MS;
    this.size = Math.max(2, Math.ceil((opts.windowMs ?? STATUS_WINDOW_MS) / this.intervalMs));
    this.inRates = new SampleRing(this.size);
    this.outRates = new SampleRing(this.size);
  }

  private now(): number {
    return (this.opts.now ?? Date.now)();
  }

  async start(): Promise<void> {
    if (this.timer) return;
    await this.sample();
    this.timer = setInterval(() => void this.sample(), this.intervalMs);
    this.timer.unref();
  }

  async close(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
  }

  /** Read the two counters and record the rates since the previous sample. Public for the timer and for tests with a clock. */
  async sample(): Promise<void> {
    if (this.sampling) return;
    this.sampling = true;
    try {
      const t = this.now();
      const [inc, outc] = await Promise.all([
        counterValue(this.opts.registry, 'connector_messages_total', { direction: 'in' }).catch(() => null),
        counterValue(this.opts.registry, 'connector_uplink_messages_acked_total').catch(() => null),
      ]);
      const prev = this.last;
      this.last = { t, in: inc, out: outc };
      if (!prev || t <= prev.t) return;
      const dt = (t - prev.t) / 1000;
      // a counter that went down was reset (registry rebuilt): count from zero
      const rate = (a: number | null, b: number | null): number => (a === null || b === null ? 0 : Math.max(0, b >= a ? b - a : b) / dt);
      this.inRates.push(t, round2(rate(prev.in, inc)));
      this.outRates.push(t, round2(rate(prev.out, outc)));
    } finally {
      this.sampling = false;
    }
  }

  throughput(): ThroughputSeries {
    const ins = this.inRates.toArray();
    const outs = this.outRates.toArray();
    return {
      interval_s: this.intervalMs / 1000,
      window_s: (this.size * this.intervalMs) / 1000,
      t: ins.map((s) => s.t),
      in_per_s: ins.map((s) => s.v),
      delivered_per_s: outs.map((s) => s.v),
    };
  }

  /**
   * Drain rate (messages acknowledged by the cloud per second) and arrival rate (messages in per
   * second): the mean over the last minute of samples; null until one interval has been sampled.
   * The one place both are computed: the page's journal card and `connector status` (through
   * daemonStatus) read them from here.
   */
  rates(): { drain_per_s: number | null; in_per_s: number | null } {
    const recent = Math.max(1, Math.round(60000 / this.intervalMs));
    const mean = (r: SampleRing): number | null => {
      const a = r.toArray().slice(-recent);
      return a.length === 0 ? null : round2(a.reduce((x, y) => x + y.v, 0) / a.length);
    };
    return { drain_per_s: mean(this.outRates), in_per_s: mean(this.inRates) };
  }

  /** The page's data: named facts only, redacted. */
  json(): StatusJson {
    const now = this.now();
    const s = this.opts.status();
    const sum = s.summary;
    const tp = this.throughput();
    const rates = this.rates();
    const token = sum.expiries.find((e) => e.what === 'cloud token');
    const certs: (Expiry & { warn: boolean })[] = [
      ...sum.expiries.filter((e) => e !== token),
      ...(s.device_certificates?.soonest ?? []).map((e) => ({ what: e.what, expires_at: e.expires_at, seconds_left: e.seconds_left })),
    ].map((e) => ({ ...e, warn: e.seconds_left < EXPIRY_WARN_S }));
    const out: StatusJson = {
      generated_at: new Date(now).toISOString(),
      version: s.version,
      uptime_s: s.uptime_s,
      ready: { ready: s.ready.ready, reasons: [...s.ready.reasons] },
      devices: { connected: sum.devices_connected, registered: sum.devices_registered },
      throughput: tp,
      journal: sum.journal
        ? { messages: sum.journal.messages, bytes: sum.journal.bytes, oldest_age_s: sum.journal.oldest_unacked_age_s, drain_per_s: rates.drain_per_s, in_per_s: rates.in_per_s }
        : null,
      uplink: sum.uplink
        ? {
            state: sum.uplink.state,
            connected: sum.uplink.state === 'connected',
            last_ack_age_s: sum.uplink.last_ack_age_s,
            reconnects: sum.uplink.reconnects,
            token_expires_at: token?.expires_at ?? null,
            token_expires_in_s: token?.seconds_left ?? null,
          }
        : null,
      certificates: certs,
      logs: this.opts.logs?.entries() ?? [],
    };
    return redactValue(out) as StatusJson;
  }
}

// ─── the page ────────────────────────────────────────────────────────────────

const STYLE = `
:root{--bg:#f6f7f9;--card:#fff;--fg:#1d232b;--dim:#5b6571;--line:#dde1e6;--ok:#17803d;--warn:#a15c00;--warnbg:#fff4e0;--bad:#b42318;--badbg:#fdecea;--in:#2563eb;--out:#0f9d58}
@media (prefers-color-scheme:dark){:root{--bg:#111418;--card:#1a1f25;--fg:#e6e9ed;--dim:#9aa4af;--line:#2c333b;--ok:#4ade80;--warn:#fbbf24;--warnbg:#3a2c10;--bad:#f87171;--badbg:#3b1717;--in:#60a5fa;--out:#34d399}}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;background:var(--bg);color:var(--fg)}
header{display:flex;flex-wrap:wrap;align-items:center;gap:12px;padding:14px 20px;border-bottom:1px solid var(--line);background:var(--card)}
h1{font-size:17px;margin:0;font-weight:600}
h2{font-size:12px;margin:0 0 8px;text-transform:uppercase;letter-spacing:.06em;color:var(--dim);font-weight:600}
.badge{padding:3px 10px;border-radius:999px;font-weight:600;font-size:13px}
.badge.ok{background:var(--ok);color:#fff}.badge.bad{background:var(--bad);color:#fff}.badge.unknown{background:var(--dim);color:#fff}
.meta{color:var(--dim);font-size:12px;margin-left:auto}
main{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:14px;padding:16px 20px}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:14px 16px}
section.wide{grid-column:1/-1}
.big{font-size:26px;font-weight:600;font-variant-numeric:tabular-nums}
.unit{font-size:13px;color:var(--dim);font-weight:400;margin-left:4px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 14px;margin:0}
dt{color:var(--dim)}dd{margin:0;font-variant-numeric:tabular-nums}
.spark{width:100%;height:64px;display:block;margin-top:6px}
.spark polyline{fill:none;stroke-width:1.6;vector-effect:non-scaling-stroke}
.spark .area{stroke:none;opacity:.15}
.in polyline,.in .area{stroke:var(--in);fill:var(--in)}.in polyline{fill:none}
.out polyline,.out .area{stroke:var(--out);fill:var(--out)}.out polyline{fill:none}
.row{display:flex;gap:24px;flex-wrap:wrap}
.row>div{flex:1;min-width:220px}
.reasons{margin:6px 0 0;padding-left:18px;color:var(--bad)}
table{width:100%;border-collapse:collapse}
td,th{text-align:left;padding:5px 6px;border-bottom:1px solid var(--line);vertical-align:top}
td.mono{white-space:nowrap}
th{color:var(--dim);font-weight:500;font-size:12px}
tr.warn td{background:var(--warnbg);color:var(--warn)}tr.bad td{background:var(--badbg);color:var(--bad)}
.lvl-warn{color:var(--warn);font-weight:600}.lvl-error,.lvl-fatal{color:var(--bad);font-weight:600}
.ok{color:var(--ok)}.bad{color:var(--bad)}.warn{color:var(--warn)}
.mono{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px}
.empty{color:var(--dim)}
#stale{display:none;background:var(--badbg);color:var(--bad);padding:8px 20px;border-bottom:1px solid var(--line)}
#stale.show{display:block}
`;

const SCRIPT = `
(function(){
'use strict';
var $=function(id){return document.getElementById(id)};
var set=function(id,v){var e=$(id);if(e)e.textContent=v};
var num=function(v,d){return v===null||v===undefined?'–':Number(v).toLocaleString('en-US',{maximumFractionDigits:d===undefined?0:d})};
function dur(s){if(s===null||s===undefined)return '–';var neg=s<0;s=Math.abs(Math.round(s));var d=Math.floor(s/86400),h=Math.floor(s%86400/3600),m=Math.floor(s%3600/60),x=s%60;
var r=d?d+'d '+h+'h':h?h+'h '+m+'m':m?m+'m '+x+'s':x+'s';return neg?'-'+r:r}
function bytes(n){if(n===null||n===undefined)return '–';var u=['B','KiB','MiB','GiB','TiB'],i=0;while(n>=1024&&i<u.length-1){n/=1024;i++}return (i?n.toFixed(1):n)+' '+u[i]}
var NS='http://www.w3.org/2000/svg';
function spark(id,ts,vals,win){var svg=$(id);if(!svg)return;while(svg.firstChild)svg.removeChild(svg.firstChild);
var W=300,H=60,n=vals.length,max=1,end=n?ts[n-1]:0;for(var i=0;i<n;i++)if(vals[i]>max)max=vals[i];
var pts=[];for(var j=0;j<n;j++){var x=Math.max(0,W-(end-ts[j])/(win*1000)*W),y=H-2-(vals[j]/max)*(H-6);pts.push(x.toFixed(1)+','+y.toFixed(1))}
if(n>0){var x0=pts[0].split(',')[0];var a=document.createElementNS(NS,'polygon');a.setAttribute('class','area');a.setAttribute('points',x0+','+H+' '+pts.join(' ')+' '+W+','+H);svg.appendChild(a);
var p=document.createElementNS(NS,'polyline');p.setAttribute('points',pts.join(' '));svg.appendChild(p)}
svg.setAttribute('data-points',String(n));return max}
function td(tr,text,cls){var c=document.createElement('td');c.textContent=text;if(cls)c.className=cls;tr.appendChild(c);return c}
function render(s){
var b=$('ready');b.textContent=s.ready.ready?'READY':'NOT READY';b.className='badge '+(s.ready.ready?'ok':'bad');
set('ready-text',s.ready.ready?'ready: every component started and every readiness check passes':'not ready');$('ready-text').className=s.ready.ready?'ok':'bad';
var rl=$('reasons');while(rl.firstChild)rl.removeChild(rl.firstChild);
s.ready.reasons.forEach(function(r){var li=document.createElement('li');li.textContent=r;rl.appendChild(li)});
set('version','edge-connector '+s.version+' · up '+dur(s.uptime_s)+' · updated '+new Date(s.generated_at).toLocaleTimeString());
set('devices-connected',num(s.devices.connected));set('devices-registered',num(s.devices.registered));
var tp=s.throughput,li=tp.in_per_s,lo=tp.delivered_per_s;
set('in-rate',num(li.length?li[li.length-1]:null,1));set('out-rate',num(lo.length?lo[lo.length-1]:null,1));
var mi=spark('spark-in',tp.t,li,tp.window_s),mo=spark('spark-out',tp.t,lo,tp.window_s);
set('in-max','max '+num(mi,1)+'/s');set('out-max','max '+num(mo,1)+'/s');
set('window','last '+dur(tp.window_s)+' (data since '+dur(Math.min(tp.window_s,tp.t.length*tp.interval_s))+') · one point every '+tp.interval_s+'s');
var j=s.journal;
if(j){set('journal-messages',num(j.messages));set('journal-bytes',bytes(j.bytes));set('journal-oldest',j.messages===0?'nothing waiting':j.oldest_age_s===null?'–':j.oldest_age_s<1?'< 1s':dur(j.oldest_age_s));
set('journal-drain',j.drain_per_s===null?'–':num(j.drain_per_s,1)+' msg/s');
var eta='–',dr=j.drain_per_s,ir=j.in_per_s;if(j.messages===0)eta='empty';else if(dr!==null&&ir!==null){if(dr>ir*1.05)eta='≈ '+dur(j.messages/(dr-ir));else if(dr>0&&dr>=ir*0.95)eta='keeping up';else eta='growing: more in than delivered'}set('journal-eta',eta)}
else{set('journal-messages','off');set('journal-bytes','–');set('journal-oldest','–');set('journal-drain','–');set('journal-eta','–')}
var u=s.uplink,us=$('uplink-state');
if(u){us.textContent=u.state||'unknown';us.className=u.connected?'ok':'bad';set('uplink-ack',u.last_ack_age_s===null?'no ack yet':dur(u.last_ack_age_s)+' ago');
set('uplink-reconnects',num(u.reconnects));var te=$('uplink-token');te.textContent=u.token_expires_in_s===null?'–':(u.token_expires_in_s<=0?'expired':'in '+dur(u.token_expires_in_s));te.className=u.token_expires_in_s!==null&&u.token_expires_in_s<=0?'bad':''}
else{us.textContent='off';us.className='';set('uplink-ack','–');set('uplink-reconnects','–');set('uplink-token','–')}
var cb=$('certs');while(cb.firstChild)cb.removeChild(cb.firstChild);
if(!s.certificates.length){var r0=document.createElement('tr');td(r0,'no certificates known','empty').colSpan=3;cb.appendChild(r0)}
s.certificates.forEach(function(c){var tr=document.createElement('tr');tr.className=c.seconds_left<=0?'bad':c.warn?'warn':'';td(tr,c.what);td(tr,c.expires_at.slice(0,10),'mono');td(tr,c.seconds_left<=0?'expired '+dur(-c.seconds_left)+' ago':'in '+dur(c.seconds_left));cb.appendChild(tr)});
var lb=$('logs');while(lb.firstChild)lb.removeChild(lb.firstChild);
if(!s.logs.length){var r1=document.createElement('tr');td(r1,'no warnings or errors since start','empty').colSpan=4;lb.appendChild(r1)}
s.logs.forEach(function(l){var tr=document.createElement('tr');td(tr,new Date(l.time).toLocaleTimeString(),'mono');td(tr,l.level,'lvl-'+l.level);
td(tr,(l.component||'')+(l.deviceId?' / '+l.deviceId:''));td(tr,l.msg+(l.code?' ('+l.code+')':''));lb.appendChild(tr)});
document.body.setAttribute('data-loaded','1')}
var timer;
function tick(){fetch('status.json',{cache:'no-store',headers:{accept:'application/json'}}).then(function(r){if(!r.ok)throw new Error('HTTP '+r.status);return r.json()})
.then(function(s){$('stale').className='';render(s)},function(e){var st=$('stale');st.textContent='cannot reach the daemon ('+e.message+'); retrying';st.className='show'})
.then(function(){timer=setTimeout(tick,REFRESH_MS)})}
tick();
})();
`;

const sha256 = (s: string): string => `'sha256-${createHash('sha256').update(s, 'utf8').digest('base64')}'`;

/** The page (inline style and script) and the CSP that allows exactly those two. */
export function statusPageHtml(refreshMs = STATUS_INTERVAL_MS): { html: string; csp: string } {
  const script = SCRIPT.replace('REFRESH_MS', String(Math.max(1000, Math.round(refreshMs))));
  const html = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<link rel="icon" href="data:,">
<title>edge-connector status</title>
<style>${STYLE}</style>
</head>
<body>
<header><h1>edge-connector</h1><span id="ready" class="badge unknown">…</span><span id="version" class="meta">loading…</span></header>
<div id="stale" role="alert"></div>
<noscript><p>This page needs JavaScript; the same data is at <a href="status.json">status.json</a>.</p></noscript>
<main>
<section><h2>Readiness</h2><div id="ready-text">–</div><ul id="reasons" class="reasons"></ul></section>
<section><h2>Devices</h2><dl><dt>connected</dt><dd><span id="devices-connected" class="big">–</span></dd><dt>registered (active)</dt><dd id="devices-registered">–</dd></dl></section>
<section class="wide"><h2>Messages</h2><div class="row">
<div class="in"><div><span id="in-rate" class="big">–</span><span class="unit">in / s</span> <span id="in-max" class="meta"></span></div><svg id="spark-in" class="spark" viewBox="0 0 300 60" preserveAspectRatio="none" role="img" aria-label="messages in per second"></svg></div>
<div class="out"><div><span id="out-rate" class="big">–</span><span class="unit">delivered / s</span> <span id="out-max" class="meta"></span></div><svg id="spark-out" class="spark" viewBox="0 0 300 60" preserveAspectRatio="none" role="img" aria-label="messages delivered per second"></svg></div>
</div><div id="window" class="meta"></div></section>
<section><h2>Journal</h2><dl><dt>backlog</dt><dd><span id="journal-messages">–</span> messages (<span id="journal-bytes">–</span>)</dd>
<dt>oldest waiting</dt><dd id="journal-oldest">–</dd><dt>drain rate</dt><dd id="journal-drain">–</dd><dt>trend</dt><dd id="journal-eta">–</dd></dl></section>
<section><h2>Uplink</h2><dl><dt>state</dt><dd id="uplink-state">–</dd><dt>last cloud ack</dt><dd id="uplink-ack">–</dd>
<dt>reconnects</dt><dd id="uplink-reconnects">–</dd><dt>token expires</dt><dd id="uplink-token">–</dd></dl></section>
<section><h2>Certificates</h2><table><thead><tr><th>what</th><th>expires</th><th></th></tr></thead><tbody id="certs"></tbody></table></section>
<section class="wide"><h2>Last warnings and errors</h2><table><thead><tr><th>time</th><th>level</th><th>where</th><th>message</th></tr></thead><tbody id="logs"></tbody></table></section>
</main>
<script>${script}</script>
</body>
</html>
`;
  const csp = [
    "default-src 'none'",
    `script-src ${sha256(script)}`,
    `style-src ${sha256(STYLE)}`,
    "connect-src 'self'",
    'img-src data:',
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
  ].join('; ');
  return { html, csp };
}
