// Compiles only with `openapi-typescript --default-non-nullable false` (the README's
// setting): params with a default (months, month_offset) may then be left out.
import type { components } from "./schema.js";

export const launch: components["schemas"]["LaunchSiiSyncDocuments"] = {
  task_type: "sii.sync_documents",
  params: { company_id: "94d8658c-c8bf-58e5-aaca-c14fac456724" },
};
