// Must NOT compile (tests/test_ts_client.py): `status` is the TaskStatus enum, so a
// comparison with a value Celery never sends is a type error (TS2367).
import type { components } from "./schema.js";

export function finished(status: components["schemas"]["TaskStatusResponse"]): boolean {
  return status.status === "success";
}
