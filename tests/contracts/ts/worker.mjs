// The official TypeScript SDK's Connect worker, in its default settings (checkpointing on),
// run by tests/contracts/test_ts_sdk.py against the dev gateway.
//
// Environment: INNGEST_BASE_URL (the gateway's API), WORKER_ID (instance id), EXEC_LOG
// (a file that gets one line per step body executed: "<worker> <step> <attempt>"),
// SLOW_MS (how long the "work" step of the slow function takes).
// Prints "ACTIVE <connection id>" once connected; SIGTERM drains (the SDK's own handler).
import { appendFileSync } from "node:fs";
import { Inngest } from "inngest";
import { connect } from "inngest/connect";

const worker = process.env.WORKER_ID ?? "ts-1";
const execLog = process.env.EXEC_LOG;
const slowMs = Number(process.env.SLOW_MS ?? "1500");

function executed(step, attempt) {
  appendFileSync(execLog, `${worker} ${step} ${attempt}\n`);
}

const client = new Inngest({
  id: "ts-contract",
  isDev: true,
  baseUrl: process.env.INNGEST_BASE_URL,
  logger: console,
});

const threeSteps = client.createFunction(
  { id: "three-steps", triggers: [{ event: "ts/three" }] },
  async ({ event, step, attempt }) => {
    const a = await step.run("a", () => { executed("a", attempt); return "a-ok"; });
    const b = await step.run("b", () => { executed("b", attempt); return "b-ok"; });
    const c = await step.run("c", () => { executed("c", attempt); return "c-ok"; });
    return { a, b, c, n: event.data.n };
  },
);

// A retry and a sleep while the SDK checkpoints, then a parallel fan-out (after which
// Inngest plans every step: no more checkpointing in this run).
const mixed = client.createFunction(
  { id: "mixed", retries: 2, triggers: [{ event: "ts/mixed" }] },
  async ({ step, attempt }) => {
    const flaky = await step.run("flaky", () => {
      executed("flaky", attempt);
      if (attempt === 0) throw new Error("first attempt fails");
      return "flaky";
    });
    await step.sleep("nap", "1s"); // the SDK rounds durable waits up to 1 s
    const parallel = await Promise.all([
      step.run("p1", () => { executed("p1", attempt); return "p1"; }),
      step.run("p2", () => { executed("p2", attempt); return "p2"; }),
    ]);
    const last = await step.run("last", () => { executed("last", attempt); return "last"; });
    return [...parallel, flaky, last];
  },
);

const slow = client.createFunction(
  { id: "slow", triggers: [{ event: "ts/slow" }] },
  async ({ step, attempt }) => {
    const work = await step.run("work", async () => {
      executed("work", attempt);
      await new Promise((resolve) => setTimeout(resolve, slowMs));
      return "worked";
    });
    const after = await step.run("after", () => { executed("after", attempt); return "after"; });
    return { work, after };
  },
);

const connection = await connect({
  apps: [{ client, functions: [threeSteps, mixed, slow] }],
  instanceId: worker,
});
console.log(`ACTIVE ${connection.connectionId}`);
await connection.closed;
console.log("CLOSED");
