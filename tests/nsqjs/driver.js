// Drive the nsqjs client (npm) against an nsqd, printing one JSON line per event.
//   node driver.js read  TOPIC CHANNEL COUNT HOST:PORT [requeue-first]
//   node driver.js write TOPIC COUNT HOST:PORT [batch]
const nsq = require('nsqjs')

const emit = (fields) => process.stdout.write(JSON.stringify(fields) + '\n')
const [mode, topic, ...rest] = process.argv.slice(2)
setTimeout(() => { emit({ event: 'timeout' }); process.exit(2) }, 30000)

if (mode === 'read') {
  const [channel, count, address, requeueFirst] = rest
  const reader = new nsq.Reader(topic, channel, { nsqdTCPAddresses: [address], maxInFlight: 10 })
  let seen = 0
  reader.on('message', (msg) => {
    const body = msg.body.toString()
    if (requeueFirst && msg.attempts === 1) {
      emit({ event: 'requeue', body, attempts: msg.attempts })
      msg.requeue(0, false)
      return
    }
    emit({ event: 'message', body, attempts: msg.attempts, id: msg.id })
    msg.finish()
    seen += 1
    if (seen >= Number(count)) {
      // let the FIN go out first
      setTimeout(() => { reader.close(); emit({ event: 'done', count: seen }); process.exit(0) }, 300)
    }
  })
  reader.on('error', (err) => emit({ event: 'error', error: String(err) }))
  reader.connect()
} else {
  const [count, address, batch] = rest
  const [host, port] = address.split(':')
  const writer = new nsq.Writer(host, Number(port))
  writer.on('ready', () => {
    const n = Number(count)
    const size = Number(batch || 1)
    let acked = 0
    const bodies = Array.from({ length: n }, (_, i) => `js-${i}`)
    const done = (err) => {
      if (err) { emit({ event: 'error', error: String(err) }); process.exit(1) }
      acked += 1
      if (acked * size >= n) { emit({ event: 'done', acked }); writer.close(); process.exit(0) }
    }
    for (let i = 0; i < n; i += size) {
      const chunk = bodies.slice(i, i + size)
      writer.publish(topic, size === 1 ? chunk[0] : chunk, done)
    }
  })
  writer.on('error', (err) => { emit({ event: 'error', error: String(err) }); process.exit(1) })
  writer.connect()
}
