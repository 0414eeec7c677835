// Strict-mode validation of the contract's JSON Schemas with a third-party validator.
//
// Usage: node check_schemas.mjs SCHEMA_DIR EXAMPLES_JSON
//   SCHEMA_DIR     the directory of *.json schemas (schemas/json)
//   EXAMPLES_JSON  a file holding [[schemaFile, payload], ...] to validate
// Prints one JSON object: {"compiled": [...], "errors": [...]} and exits 1 on any error.
// ajv's strict mode (strict: true) refuses unknown keywords, `pattern` without a string
// type, unknown formats and the rest of what code generators trip over.
import { readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";
import Ajv2020 from "ajv/dist/2020.js";
import addFormats from "ajv-formats";

const [schemaDir, examplesFile] = process.argv.slice(2);
const errors = [];
const compiled = [];
const validators = new Map();
for (const name of readdirSync(schemaDir).filter((n) => n.endsWith(".json")).sort()) {
  // One Ajv per schema: every file is standalone, several share $defs names.
  const ajv = new Ajv2020({ strict: true, allErrors: true });
  addFormats(ajv);
  try {
    validators.set(name, ajv.compile(JSON.parse(readFileSync(join(schemaDir, name), "utf8"))));
    compiled.push(name);
  } catch (exc) {
    errors.push({ schema: name, error: String(exc.message || exc) });
  }
}
if (examplesFile) {
  const examples = JSON.parse(readFileSync(examplesFile, "utf8"));
  examples.forEach(([name, payload], index) => {
    const validate = validators.get(name);
    if (validate === undefined) {
      errors.push({ schema: name, example: index, error: "no such compiled schema" });
    } else if (!validate(payload)) {
      errors.push({ schema: name, example: index, error: JSON.stringify(validate.errors) });
    }
  });
}
console.log(JSON.stringify({ compiled, errors }));
process.exit(errors.length ? 1 : 0);
