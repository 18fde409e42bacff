// Import a module of the dashboard (realtime_lab/static/) into a node test: `await load("x.js")`.
//
// The static directory is the browser's and has no package.json saying "type": "module", so
// node before 20.19 / 22.7 would read its .js files as CommonJS. A load hook tells node they
// are ES modules, for the module asked for and every module it imports.
import { register } from "node:module";

const STATIC = new URL("../../realtime_lab/static/", import.meta.url);

const HOOKS = `
import { readFile } from "node:fs/promises";
const STATIC = ${JSON.stringify(STATIC.href)};
export async function load(url, context, next) {
  if (url.startsWith(STATIC) && new URL(url).pathname.endsWith(".js")) {
    return { format: "module", source: await readFile(new URL(url), "utf8"), shortCircuit: true };
  }
  return next(url, context);
}
`;

register(`data:text/javascript,${encodeURIComponent(HOOKS)}`);

/** The module `name` (a file in realtime_lab/static/). */
export function load(name) {
  return import(new URL(name, STATIC).href);
}
