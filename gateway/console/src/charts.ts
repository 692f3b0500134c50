// Time-series charts of the overview, drawn with uPlot. Each chart follows its container's width.

import uPlot from 'uplot';
import 'uplot/dist/uPlot.min.css';
import { el } from './dom';

export interface Line {
  readonly label: string;
  readonly color: string;
  /** The y scale this line uses: `left` or `right` (an axis each). */
  readonly scale: 'left' | 'right';
  /** The value in the legend, with its unit. */
  readonly format: (value: number) => string;
}

export interface Axis {
  /** A tick label: short, the unit is in the title. */
  readonly format: (value: number) => string;
  /** Ticks on whole numbers only (counts). */
  readonly integer?: boolean;
}

export interface ChartOptions {
  readonly title: string;
  readonly lines: readonly Line[];
  /** Fixed range of the left scale (percentages); otherwise from 0 to the data's maximum. */
  readonly leftRange?: readonly [number, number];
  readonly leftAxis: Axis;
  readonly rightAxis?: Axis;
  readonly testId: string;
}

const HEIGHT_PX = 170;

function upToMaximum(_chart: uPlot, _minimum: number | null, maximum: number | null): uPlot.Range.MinMax {
  const top = maximum !== null && Number.isFinite(maximum) && maximum > 0 ? maximum * 1.15 : 1;
  return [0, top];
}

const WHOLE_INCREMENTS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000];

function yAxis(axis: Axis): uPlot.Axis {
  return {
    stroke: '#4a5563',
    size: 60,
    values: (_chart, splits) => splits.map((value) => axis.format(value)),
    ...(axis.integer === true ? { incrs: WHOLE_INCREMENTS } : {}),
  };
}

export class TimeChart {
  readonly element: HTMLElement;
  private readonly plot: uPlot;
  private readonly resize: ResizeObserver;

  constructor(options: ChartOptions) {
    const canvasHolder = el('div', { class: 'chart-canvas' });
    this.element = el('figure', { class: 'chart', 'data-testid': options.testId }, [
      el('figcaption', { text: options.title }),
      canvasHolder,
    ]);
    const leftRange = options.leftRange;
    const axes: uPlot.Axis[] = [
      { stroke: '#4a5563', grid: { stroke: '#e6e9ee', width: 1 }, ticks: { stroke: '#e6e9ee', width: 1 } },
      {
        ...yAxis(options.leftAxis),
        scale: 'left',
        grid: { stroke: '#e6e9ee', width: 1 },
        ticks: { stroke: '#e6e9ee', width: 1 },
      },
    ];
    if (options.rightAxis !== undefined) {
      axes.push({ ...yAxis(options.rightAxis), scale: 'right', side: 1, grid: { show: false } });
    }
    const plotOptions: uPlot.Options = {
      width: 400,
      height: HEIGHT_PX,
      scales: {
        x: { time: true },
        left: { range: leftRange === undefined ? upToMaximum : [leftRange[0], leftRange[1]] },
        right: { range: upToMaximum },
      },
      series: [
        {},
        ...options.lines.map(
          (line): uPlot.Series => ({
            label: line.label,
            stroke: line.color,
            width: 1.5,
            scale: line.scale,
            spanGaps: false,
            points: { show: false },
            value: (_chart, value) => (value === null || value === undefined ? '–' : line.format(value)),
          }),
        ),
      ],
      axes,
      cursor: { drag: { x: false, y: false } },
      legend: { live: true },
    };
    this.plot = new uPlot(plotOptions, [[], ...options.lines.map(() => [])], canvasHolder);
    this.resize = new ResizeObserver(() => this.fit(canvasHolder));
    this.resize.observe(canvasHolder);
  }

  /** Replaces the data: shared times (seconds) and one column per line. */
  update(times: readonly number[], columns: readonly (readonly (number | null)[])[]): void {
    this.plot.setData([times as number[], ...columns.map((column) => column as (number | null)[])]);
  }

  destroy(): void {
    this.resize.disconnect();
    this.plot.destroy();
  }

  private fit(holder: HTMLElement): void {
    const width = Math.floor(holder.clientWidth);
    if (width > 0 && width !== this.plot.width) {
      this.plot.setSize({ width, height: HEIGHT_PX });
    }
  }
}
