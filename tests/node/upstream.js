// A plain Node.js HTTP server with Node's default keep-alive (keepAliveTimeout 5 s),
// speaking just enough WAHA for the router: probe, per-session GET and sendText.
// Prints "NODE READY <port>" once listening.
const http = require("http");

const sessions = new Set((process.env.SESSIONS || "node-1").split(","));
let sends = 0;

const server = http.createServer((req, res) => {
  let body = "";
  req.on("data", (c) => (body += c));
  req.on("end", () => {
    const url = new URL(req.url, "http://x");
    const reply = (status, obj) => {
      res.writeHead(status, { "Content-Type": "application/json" });
      res.end(JSON.stringify(obj));
    };
    let m;
    if (url.pathname === "/health") return reply(200, { status: "ok" });
    if ((m = url.pathname.match(/^\/api\/sessions\/([^/]+)$/))) {
      return sessions.has(m[1])
        ? reply(200, { name: m[1], status: "WORKING" })
        : reply(404, { message: "Session not found" });
    }
    if (url.pathname === "/api/sendText" && req.method === "POST") {
      const msg = JSON.parse(body || "{}");
      if (!sessions.has(msg.session || "default")) return reply(404, { message: "Session not found" });
      sends += 1;
      return reply(201, { id: `true_${msg.chatId}_${sends}`, sends });
    }
    if (url.pathname === "/_node/stats") return reply(200, { sends, keepAliveTimeout: server.keepAliveTimeout });
    if ((m = url.pathname.match(/^\/api\/([^/]+)\//)) && sessions.has(m[1])) {
      return reply(200, { session: m[1], path: url.pathname, socket: req.socket.remotePort });
    }
    reply(404, { message: "not found" });
  });
});

server.listen(Number(process.env.PORT || 0), "127.0.0.1", () => {
  console.log(`NODE READY ${server.address().port}`);
});
