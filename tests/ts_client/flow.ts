// The README's flow through a client generated with openapi-typescript (default options)
// and called with openapi-fetch: list the catalog, launch acme.add, poll its status until
// SUCCESS, read the typed progress fields, read the history. tests/test_ts_client.py
// generates ./schema.ts from the live server, type-checks this with `tsc --strict` and
// runs it with node; it prints one JSON line the test reads.
import createClient from "openapi-fetch";
import type { components, paths } from "./schema.js";

type TaskStatus = components["schemas"]["TaskStatus"];
type Progress = components["schemas"]["Progress"];

const baseUrl = process.env.CELERY_API_URL ?? "http://127.0.0.1:8000";
const key = process.env.CELERY_API_KEY;
const client = createClient<paths>({
  baseUrl,
  headers: key ? { Authorization: `Bearer ${key}` } : {},
});

function fail(what: string, error: unknown): never {
  throw new Error(`${what}: ${JSON.stringify(error)}`);
}

// A progress report, typed: every field is there (number | null), no `unknown`.
function describe(progress: Progress | null): string {
  if (progress === null) return "no progress reported";
  const percent: number | null = progress.percent;
  return `${progress.current ?? "?"}/${progress.total ?? "?"} (${percent ?? 0}%) ${progress.message ?? ""}`;
}

async function waitFor(taskId: string, wanted: TaskStatus) {
  const seen: string[] = [];
  for (let attempt = 0; attempt < 300; attempt++) {
    const { data, error } = await client.GET("/api/celery/tasks/{task_id}", {
      params: { path: { task_id: taskId } },
    });
    if (error) fail("status", error);
    // `children`, `tags`, `retried_as` are required: arrays, never undefined.
    const lineage: number = data.children.length + data.retried_as.length + data.tags.length;
    seen.push(`${data.status} ${describe(data.progress)} ${lineage}`);
    if (data.status === wanted) return { status: data, seen };
    if (data.status === "FAILURE" || data.status === "REVOKED") fail("run ended", data);
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
  throw new Error(`${taskId} never reached ${wanted}: ${seen.join(", ")}`);
}

async function main() {
  const catalog = await client.GET("/api/celery/tasks");
  if (catalog.error) fail("catalog", catalog.error);
  const taskTypes = catalog.data.map((entry) => entry.task_type);

  const launched = await client.POST("/api/celery/tasks/launch", {
    body: { task_type: "acme.add", params: { a: 2, b: 3 }, tags: ["ts-client"] },
  });
  if (launched.error) fail("launch", launched.error);
  const taskId: string = launched.data.task_id;
  const statusUrl: string = launched.data.status_url;

  const { status, seen } = await waitFor(taskId, "SUCCESS");
  const progress: string = describe(status.progress);

  const sync = await client.POST("/api/celery/tasks/launch", {
    body: {
      task_type: "sii.sync_documents",
      // month_offset has a default; openapi-typescript 7's defaults (defaultNonNullable)
      // make it required in the type, so it is sent (README, "Generated clients").
      params: { company_id: "94d8658c-c8bf-58e5-aaca-c14fac456724", months: 2, month_offset: 0 },
    },
  });
  if (sync.error) fail("launch sii.sync_documents", sync.error);
  const synced = await waitFor(sync.data.task_id, "SUCCESS");

  // The event stream of the finished run: its text, typed string (parseAs "text": the
  // document says text/event-stream, openapi-fetch parses JSON unless told).
  const events = await client.GET("/api/celery/tasks/{task_id}/events", {
    params: { path: { task_id: taskId } },
    parseAs: "text",
  });
  if (events.error) fail("events", events.error);
  const streamed: string = events.data;
  const lastData = streamed.split("\n").filter((line) => line.startsWith("data: ")).pop();
  const streamedStatus: string = lastData ? JSON.parse(lastData.slice(6)).status : "none";

  const history = await client.GET("/api/celery/history", {
    params: { query: { task_type: ["acme.add"], status: ["SUCCESS"], tag: "ts-client", limit: 10 } },
  });
  if (history.error) fail("history", history.error);
  const rows = history.data.items.map((row) => ({ task_id: row.task_id, status: row.status }));

  const missing = await client.GET("/api/celery/tasks/{task_id}", {
    params: { path: { task_id: "00000000-0000-4000-8000-000000000000" } },
  });
  const problem = missing.error ? { status: missing.response.status, detail: missing.error.detail } : null;

  console.log(JSON.stringify({
    task_types: taskTypes, task_id: taskId, status_url: statusUrl, status: status.status,
    result: status.result, progress, seen, sync_progress: synced.seen, history: rows,
    next_cursor: history.data.next_cursor, problem, streamed_status: streamedStatus,
  }));
}

main().catch((error: unknown) => {
  console.error(error);
  process.exit(1);
});
